"""The whole CelebA training partition in bounded memory: peak RSS, first and later epochs and
images/s of `cnnflow train` over all 162,770 training faces, through the folder source and through
the TFDS source, and the 16,000-image recipe with the cache `auto` picks next to an in-memory cache.

    python benchmarks/celeba_full.py [--folder DIR] [--runs folder,tfds,recipe] [--epochs 2]

There is no real CelebA here: DIR gets CelebA's layout at the official partition sizes (162,770 /
19,867 / 19,962 generated faces, 3.3 GB, ~25 minutes) if it has none. For the TFDS source a TFDS
data_dir is prepared from the same files by TFDS's own celeb_a builder, its download step pointed at
local copies (the network is the one thing replaced). Each run is a fresh `cnnflow train` process
with its own MLflow store; its peak RSS is the kernel's (ru_maxrss), its epochs MLflow's
`epoch_seconds`. Results also go to benchmarks/results/celeba_full.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]
SIZES = {"train": 162_770, "valid": 19_867, "test": 19_962}  # CelebA's list_eval_partition.txt

from run import cnnflow_train  # noqa: E402  (benchmarks/run.py)


def generated_layout(folder: Path) -> Path:
    if not (folder / "list_eval_partition.txt").is_file():
        from cnnflow.components.data.celeba_layout import write_celeba

        print(f"generating {sum(SIZES.values()):,} faces in CelebA's layout in {folder} ...", file=sys.stderr, flush=True)
        write_celeba(folder, SIZES["train"], SIZES["valid"], SIZES["test"])
    return folder


def prepared_tfds(folder: Path, data_dir: Path) -> Path:
    """TFDS's celeb_a prepared from the files in `folder` (zip of the images, the lists, landmarks and
    identities as CelebA ships them), by TFDS's builder with downloads replaced by those files."""
    import zipfile
    from unittest import mock

    import tensorflow_datasets as tfds

    builder = tfds.builder("celeb_a", data_dir=str(data_dir))
    if (builder.data_path / "dataset_info.json").exists():
        return data_dir
    print(f"preparing TFDS celeb_a in {data_dir} ...", file=sys.stderr, flush=True)
    files = data_dir / "downloads-by-hand"
    files.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in (folder / "img_align_celeba").iterdir())
    with zipfile.ZipFile(files / "img_align_celeba.zip", "w", zipfile.ZIP_STORED) as archive:
        for name in names:
            archive.write(folder / "img_align_celeba" / name, f"img_align_celeba/{name}")
    heading = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
    (files / "landmarks.txt").write_text(f"{len(names)}\n{heading}\n"
                                         + "".join(f"{n} 69 109 106 113 77 142 73 152 108 154\n" for n in names))
    (files / "identity.txt").write_text("".join(f"{n} {i % 10177 + 1}\n" for i, n in enumerate(names)))
    local = {"img_align_celeba": files / "img_align_celeba.zip", "list_eval_partition": folder / "list_eval_partition.txt",
             "list_attr_celeba": folder / "list_attr_celeba.txt", "landmarks_celeba": files / "landmarks.txt",
             "identity_celeba": files / "identity.txt"}
    with mock.patch.object(tfds.download.DownloadManager, "download", lambda self, urls: {k: local[k] for k in urls}):
        builder.download_and_prepare()
    return data_dir


def measured(overrides: list[str], workdir: Path) -> dict:
    """One `cnnflow train` in a fresh process: its epochs (MLflow) and its peak RSS (the kernel's)."""
    workdir.mkdir(parents=True, exist_ok=True)
    report = workdir / "maxrss.txt"
    launcher = [sys.executable, "-c", "import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
                "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
                "sys.exit(code)", str(report)]
    client, run = cnnflow_train(overrides, workdir, launcher=launcher)
    history = sorted(client.get_metric_history(run.info.run_id, "epoch_seconds"), key=lambda m: m.step)
    kib = int(report.read_text())
    return {"overrides": overrides, "epoch_seconds": [m.value for m in history],
            "train_images": int(run.data.tags["split.train_size"]), "val_accuracy": run.data.metrics["val_accuracy"],
            "cache": {role: run.data.tags.get(f"cache.{role}") for role in ("train", "valid")},
            "peak_rss_gib": kib * (1 if sys.platform == "darwin" else 1024) / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "celeba-full")
    parser.add_argument("--runs", default="folder,tfds,recipe", help="which of folder, tfds, recipe")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=None, help="data.cache_dir (default: cnnflow's)")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "celeba_full.json")
    args = parser.parse_args()

    folder = generated_layout(args.folder.resolve())
    work = Path(tempfile.mkdtemp(prefix="celeba-full-"))
    common = ["experiment=celeba", "plots=none", f"train.epochs={args.epochs}", "data.valid_size=1000"]
    common += [f"data.cache_dir={args.cache_dir}"] if args.cache_dir else []
    full = ["data.train_size=full"]
    runs = {}
    for name in args.runs.split(","):
        if name == "folder":
            runs["folder, full partition"] = measured([*common, *full, f"data.path={folder}"], work / name)
        elif name == "tfds":
            data_dir = prepared_tfds(folder, args.folder.resolve() / "tensorflow_datasets")
            runs["tfds, full partition"] = measured([*common, *full, "data.source=tfds", f"data.data_dir={data_dir}"],
                                                    work / name)
        elif name == "recipe":  # 16,000 faces: auto (memory here) next to the in-memory cache, alternately
            for repeat in range(2):
                for cache in ("memory", "auto"):
                    runs[f"recipe 16k, cache={cache} #{repeat + 1}"] = measured(
                        [*common, f"data.path={folder}", f"data.cache={cache}"], work / f"{name}-{cache}-{repeat}")
        else:
            parser.error(f"--runs: unknown run {name!r}; use folder, tfds, recipe")
        for label, result in runs.items():
            print(f"{label}: {json.dumps(result)}", file=sys.stderr, flush=True)

    print(f"{'run':<34}{'cache (train/valid)':<22}{'peak RSS':>10}{'1st epoch':>11}{'later':>9}{'images/s':>10}")
    for label, r in runs.items():
        seconds = r["epoch_seconds"]
        later = sum(seconds[1:]) / len(seconds[1:]) if len(seconds) > 1 else float("nan")
        print(f"{label:<34}{r['cache']['train']}/{r['cache']['valid']:<13}{r['peak_rss_gib']:>8.2f} G"
              f"{seconds[0]:>10.0f}s{later:>8.0f}s{r['train_images'] / (later if later == later else seconds[0]):>10.0f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(runs, indent=2))
    print(f"(work files in {work}; results in {args.json})", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
