"""fastcifar.kernels: fused Triton kernels for the device data path (installed under the fastcifar namespace).

Empty in this release: the fused gather + crop + flip + erase + normalise kernel, with its torch reference
(fastcifar.augment) and equivalence tests, arrives with the device data-path issue. Dispatch code must keep
working without it, so nothing imports this package yet.
"""
