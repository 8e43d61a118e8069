"""Input pipelines other than the device loader: the torchvision DataLoader fallback, NVIDIA DALI, FFCV."""
