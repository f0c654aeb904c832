"""Engine integrations of tierkv (installed as `tierkv_connectors`). Each imports only tierkv's public API."""
