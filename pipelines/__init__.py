"""Bank-side Spark pipelines: raw transactions -> validated -> point-in-time features."""
