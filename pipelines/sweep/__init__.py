"""The sweep stage kind: many training configurations as Ray Tune trials (each one run of the train stage's
Ray Train loop), early stopping, one MLflow child run per trial, and the best trial's model as its output."""
