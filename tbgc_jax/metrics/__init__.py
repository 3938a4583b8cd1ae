"""Task metrics: detection mAP50, segmentation mIoU, classification top-1, and their exports."""
