"""Orchestration, the top layer: runs trained, evaluated and logged, the tables, the notebook chain.

- `runs`: one model run start to finish (train or reuse by settings, evaluate, log), several side by side
- `workers`: where a run trains (this process, a process pool, torchrun)
- `evaluation`: features, scores, costs and figures, the same for every model
- `results`: the tables from MLflow and Welch's test across seeds
- `report`: the course's final table and figures
- `pipeline`: running the notebooks with papermill
"""
