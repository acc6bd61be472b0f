"""An engine as a runtime component: endpoints, discovery with a model card, event and load
publishing, graceful drain (DESIGN.md, package `tandem.worker`).

`Worker` works with any discovery / request plane / event plane (embedded or NATS + TCP);
`service.serve_worker` is the `tandem worker` process around it.
"""

from tandem.worker.publisher import LoadPublisher
from tandem.worker.worker import Worker, model_card

__all__ = ["LoadPublisher", "Worker", "model_card"]
