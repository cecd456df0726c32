"""Where each step runs: the deployment profile the code location is built under (``embedded``, ``cluster``,
``k8s``; ``profile.py``), the secrets its clients read (``credentials.py``) and the pool and queue tags each
asset's steps get (``steps.py``). The code location imports this package; the launcher (``pipelines/deploy/``,
which starts the profile's services) depends on it and on the code location, never the reverse."""
