"""Browser chat (Gradio) over the local engine or an OpenAI-compatible endpoint."""
