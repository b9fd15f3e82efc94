"""tokenforge: fused Triton and CUDA C++ kernels for cheaper transformer training.

    import tokenforge
    y = tokenforge.ops.rms_norm(x, weight)     # functional, autograd-aware
    norm = tokenforge.nn.RMSNorm(4096)         # drop-in for torch.nn.RMSNorm
    report = tokenforge.patch(model)           # kernels into a model (ours, Hugging Face, any nn.Module)

Backends per op: ``triton`` (default on CUDA), ``cuda`` (the C++ extension ``tokenforge._C``) and
``torch`` (the plain reference, used on CPU). ``TOKENFORGE_BACKEND`` forces one;
``tokenforge info`` says which one each op would use and why.
"""

__version__ = "0.1.0"

from tokenforge import backends, fp8, models, nn, ops, optim, sdpa_patch  # noqa: E402
from tokenforge.patch import PatchReport, patch, unpatch  # noqa: E402
from tokenforge.sdpa_patch import patch_sdpa, unpatch_sdpa  # noqa: E402

__all__ = ["PatchReport", "__version__", "backends", "fp8", "models", "nn", "ops", "optim", "patch", "patch_sdpa", "sdpa_patch", "unpatch_sdpa",
           "unpatch"]
