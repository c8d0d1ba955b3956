"""nanocustom: Stable Diffusion v1 from scratch, and Custom Diffusion, SVDiff and personalized residuals."""
