"""The consortium's aggregator: strategies, update checks, federated evaluation, MLflow registry."""
