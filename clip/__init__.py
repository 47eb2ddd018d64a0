"""gradwatch.clip: gradient norms, clippers and spike detectors as lazy MLX ops."""
