"""The app's library side: lab sessions, figures and hosting rules (app.py only wires them to Gradio)."""
