"""Running the course: parameters, training, runs tracked in MLflow, tables, the notebook chain.

- `params`: the profile schema (params/*.yaml)
- `losses`, `training`: cached features, augmentation on features, the training loop
- `runs`: one model run start to finish (train, evaluate, log), several side by side
- `metrics`: scores and costs, measured the same way for every model
- `tracking`: the MLflow store
- `report`: the final table and figures from MLflow
- `pipeline`: running the notebooks with papermill
"""
