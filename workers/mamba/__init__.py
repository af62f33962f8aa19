"""Mamba-based backbones written here: Vision Mamba (``vim``) and MambaVision (``mambavision``).

Neither is in timm, and both official codes need CUDA kernels to import; these run
anywhere in PyTorch and use the kernels on CUDA when installed (``kernels``). The
selective scan itself is in ``scan``; released weights come from the hub (``hub``).
The registered variants (``vim_small``, ``mambavision_t`` and tiny test variants) are
in ``workers.backbones``.
"""
