"""Generated CelebA fixtures in the exact native layout (no real CelebA images can be had here).

Each image is a 178x218 RGB JPEG of a drawn "face" whose Male attribute shows as a beard shadow and
short hair (female: long hair), with random position, colours, strength and noise, so a CNN can learn
it but not perfectly. Used by the tests (a few dozen images), the benchmarks, and by anyone who
wants to try the CelebA pipeline without the real files:

    python -m cnnflow.components.data.celeba_layout /tmp/celeba --train 16000 --valid 1000 --test 2000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ATTRIBUTES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()
MALE = ATTRIBUTES.index("Male")
WIDTH, HEIGHT = 178, 218


def face(male: bool, rng: np.random.Generator):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (WIDTH, HEIGHT), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    cx, cy = 89 + rng.integers(-12, 13), 115 + rng.integers(-12, 13)
    hair = tuple(int(v) for v in rng.integers(10, 120, 3))
    strength = rng.uniform(0.2, 1.0)  # how visible the beard is: some faces are ambiguous
    long_hair = (not male) != (rng.random() < 0.15)  # a few men with long hair, women with short
    if long_hair:  # falls beside the face
        length = int(rng.integers(40, 110))
        draw.rectangle([cx - 55, cy - 60, cx - 30, cy + length], fill=hair)
        draw.rectangle([cx + 30, cy - 60, cx + 55, cy + length], fill=hair)
    draw.ellipse([cx - 58, cy - 78, cx + 58, cy - 20], fill=hair)
    skin = np.array([rng.integers(150, 240), rng.integers(110, 190), rng.integers(80, 160)])
    draw.ellipse([cx - 42, cy - 60, cx + 42, cy + 55], fill=tuple(int(v) for v in skin))
    if male:  # a beard shadow on the lower face
        shadow = tuple(int(v) for v in (skin * (1 - 0.5 * strength)).astype(int))
        draw.chord([cx - 40, cy - 5, cx + 40, cy + 55], 0, 180, fill=shadow)
    for dx in (-16, 16):
        draw.ellipse([cx + dx - 5, cy - 18, cx + dx + 5, cy - 10], fill=(30, 30, 30))
    draw.line([cx - 14, cy + 25, cx + 14, cy + 25], fill=(120, 40, 40), width=3)
    pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 12, (HEIGHT, WIDTH, 3)).astype(np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_celeba(folder: Path, train: int, valid: int, test: int, seed: int = 0) -> Path:
    """img_align_celeba/NNNNNN.jpg, list_attr_celeba.txt and list_eval_partition.txt, as CelebA ships them."""
    rng = np.random.default_rng(seed)
    images = folder / "img_align_celeba"
    images.mkdir(parents=True, exist_ok=True)
    total = train + valid + test
    attribute_rows, partition_rows = [], []
    for number in range(1, total + 1):
        name = f"{number:06d}.jpg"
        values = rng.choice([-1, 1], size=len(ATTRIBUTES))
        face(values[MALE] == 1, rng).save(images / name, quality=90)
        attribute_rows.append(name + " " + " ".join(f"{v:2d}" for v in values))
        partition_rows.append(f"{name} {0 if number <= train else 1 if number <= train + valid else 2}")
    (folder / "list_attr_celeba.txt").write_text(f"{total}\n{' '.join(ATTRIBUTES)}\n" + "\n".join(attribute_rows) + "\n")
    (folder / "list_eval_partition.txt").write_text("\n".join(partition_rows) + "\n")
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--train", type=int, default=16000)
    parser.add_argument("--valid", type=int, default=1000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_celeba(args.folder, args.train, args.valid, args.test, args.seed)
    print(f"wrote {args.train + args.valid + args.test} images to {args.folder}")
