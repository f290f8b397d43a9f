"""Vision: detection (boxes, upsampling, SPP, deformable convolution, R-FCN, YOLO) and more."""
