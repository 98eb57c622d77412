"""Model families; each module registers its builders on import."""

from cnnflow.components.models import celeba_cnn, fast_cnn, mnist_cnn  # noqa: F401
