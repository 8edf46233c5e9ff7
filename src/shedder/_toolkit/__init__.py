"""The backpressure toolkit: queues, streams, pipeline, sampler, batching."""
