"""Studies that reproduce the paper's claims with the real entry points (`python -m pipeline study`).

    stability   Glow, the certified default and the old bounded preset across the learning-rate
                transition with and without clipping and in bf16, on the same shards: divergence
                rates, the exploding-inverse battery, final bpd per arm (stability/)
    optimum     linear flows on Gaussian images of known covariance and on synthetic faces at two
                resolutions against the closed-form optimum of docs/design.md §3.2 (optimum.py)
    cost        FLOPs per training image of a config's model and the GPU-hours that implies, an
                estimate for planning the studies at full scale (cost.py)

Every training run is a `python -m pipeline train` subprocess (runner.py) writing into one MLflow store
under ``<out>/runs``; rerunning a study skips the runs whose result file exists, so a long study
continues where it stopped.
"""
