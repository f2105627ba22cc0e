"""Orchestration, the top layer: runs trained, evaluated and logged, the tables, the notebook chain.

Used by notebooks 03-08 (the classifiers, the separator, the detectors), the command line and the scripts;
notebooks 09 and 10 train and log their models with :mod:`audiokd_lib.beats` and :mod:`audiokd_lib.search`.

- `runs`: one model run start to finish (train or reuse by settings, evaluate, log), several side by side;
  the separator's run and its SDR scores
- `workers`: where a run trains (this process, a process pool that dies with its notebook, torchrun)
- `evaluation`: features, scores, costs and figures, the same for every model
- `results`: the tables from MLflow and Welch's test across seeds
- `report`: the course's final table and figures; the pruned and final students, chosen by their checkpoints
- `pipeline`: running the notebooks with papermill
"""
