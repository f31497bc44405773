"""Experiment grids and their reports, beside the algorithm in train.py.

- `experiments.popgym`: the paper's POPGym grid (envs × memories × seeds) and its report, ours
  beside the paper's known cells (`python -m experiments.popgym run|report`).
- `experiments.report`: numbers, tables and curves for any `results/<experiment>/<env>/<variant>/`
  directory (`python -m experiments.report results/ablation`).
- `experiments.grid`: running cells resumably (summary.json marks a finished cell), one process
  per cell with `--jobs N`.
"""
