"""fastcifar.kernels: fused Triton kernels for the device data path (installed under the fastcifar namespace).

crop_flip: gather + padded crop + flip + normalise + erase/cutout boxes in one pass, with its torch reference and
a dispatcher (`fused_crop_flip_erase`) that falls back to the reference off CUDA or without triton. Nothing is
imported here: triton is imported only when a kernel is about to run (TRITON_INTERPRET must precede it).
"""
