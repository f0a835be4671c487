"""One module per command of the pipeline: generate → score → rank → convert → train →
evaluate, the loop that runs them (`run`), and the `report` of a run."""
