"""The Kubernetes operator (kopf). The import package is not called `operator`: that would
shadow the standard library module of the same name."""
