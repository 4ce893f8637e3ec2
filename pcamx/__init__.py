"""pcamx: specialize and compress DINOv3 ViT-S/16 for PatchCamelyon."""

import logging

# torchao (int8) registers Enum types with torch's pytree at import, which torch >= 2.14 logs as a
# deprecation on every start. It is not actionable for our users; keep the console for our own output.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

__version__ = "0.1.0"
