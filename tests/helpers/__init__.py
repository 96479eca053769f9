"""Helpers shared by the tests: real services on 127.0.0.1 (`services`) and MLflow trial runs
written as a sweep writes them (`mlflow_trials`)."""
