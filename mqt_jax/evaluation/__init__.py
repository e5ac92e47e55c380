"""Evaluation: the benchmarks (one file each), the accuracy-per-m sweep (evaluate), m-auto
calibration and frontier (policies), and Grad-CAM over the patch grid (gradcam)."""
