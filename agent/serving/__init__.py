"""The sampler as a service: the engine behind a Ray Serve deployment, and the client the agent's sample tool uses.

    agent (web / chat / graph workers, any number)          Ray cluster (one replica per GPU)
    sample_intentions --get_sampler(ctx)--> ServeSampler ==JSON + PNG==> SamplerReplica (@serve.batch) -> DragEditor

`protocol` is the wire format (pydantic, images as PNG bytes: never pickled tensors) and the batch executor the
replica runs; `ray_app` builds and starts the deployment; `client` is what the agent calls; `cli` is
`luciddrag serve sampler`. Ray is imported only by `ray_app` and `client`, and only when a deployment is used.
"""
