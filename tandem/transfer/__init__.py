"""Moving a request's KV blocks from the prefill worker that computed them to the decode worker
that continues the request.

The prefill engine exports a `KvTransferParams` (which blocks, their geometry, where to ask);
a decode engine reserves blocks of its own and asks a `KvSource` for the data:

* `LocalKvSource`: both engines in one process; the copy reads the other cache directly.
* `TcpKvSource`: the blocks are staged in host memory and streamed over the request plane
  (`kv_pull`), between processes or machines.
* `CudaIpcKvSource`: GPUs of one node; the prefill worker's cache is mapped once through
  CUDA IPC and blocks are copied device to device.

Every source ends with `release`, which lets the prefill side free its copy; a deadline on the
prefill side frees it anyway when no decode worker ever confirms.

Modules: `blocks` (payloads, layout check), `local`, `tcp`, `cuda_ipc` (the sources and the
prefill side's server), `release` (torch-free: the frontend releases blocks with it too).
"""
