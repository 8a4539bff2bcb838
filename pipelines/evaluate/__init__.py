"""The evaluate stage: held-out bits/dim (full ELBO), FID and KID against held-out data with an honest floor (real
images the feature net never saw), the quality/time table of any registered samplers (DDPM vs DDIM as in Song et al.
2021, Table 1), and for class-conditional models a classifier-free guidance sweep (FID, KID and class accuracy per
guidance scale), with plots and sample grids written as files.

config.py     EvaluateConfig (frozen pydantic)
stage.py      run_evaluate, and KIND: the stage the pipeline runner calls (loads the model and the splits)
sampling.py   "name-steps" sampler strings and timed, seeded sample generation
bpd.py        batched nll_bpd over test images and the per-t L_{t−1} curve
frechet.py    Gaussian statistics of features and the Fréchet distance (pytorch-fid conventions)
digits_net.py small CNN classifier on digits TRAIN less a hold-out: FID features, class accuracy (cached)
inception.py  pytorch-fid's FID Inception-v3, loaded only from a local state-dict file
features.py   picks the feature network and maps images to feature matrices
kid.py        KID (unbiased MMD², cubic kernel) with its standard error
table.py      the sampler table as CSV, Markdown and an FID-vs-steps plot
guidance.py   the guidance sweep's table (CSV, Markdown), plot, and class accuracy
grid.py       save_grid, shared with training; save_class_grid (a labelled row per class)
digits.py     the scikit-learn digits split at a given resolution (benchmarks and tests)
"""
