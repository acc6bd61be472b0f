"""HTTP plumbing the frontend and the router service share: OpenAI-shaped errors and the
uvicorn server that announces readiness and cleans up inside its graceful exit."""
