"""Pipeline stages: one module per DVC stage (fetch, prepare, backbone, train, evaluate, export)."""
