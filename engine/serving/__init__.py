"""Serving the engine: the engine thread (`worker`), the shared engine daemon (`daemon`, its
connections in `front`, its frames in `wire`) and `ghostline cluster` on Ray Serve (`cluster`,
`router`, `autoscaler`). `worker` and `wire` import no torch: the language server uses them."""
