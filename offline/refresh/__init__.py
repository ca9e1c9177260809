"""The nightly refresh: incremental knowledge build, publish, retrain when the knowledge space changed."""
