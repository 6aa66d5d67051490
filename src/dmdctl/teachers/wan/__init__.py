"""Wan 2.1 text-to-video teachers (diffusers ``WanPipeline`` folders): the kind and its presets
(``kind.py``), the pipeline's parts (``pipeline.py``: config, UMT5 prompts, the video VAE), the
transformer as a flow denoiser (``denoiser.py``), videos and the diffusers export
(``generate.py``) and tiny random pipelines for tests (``testing.py``)."""
