"""The Gradio canvas (``dagfusion ui``); it reads only the registry's schemas and the event stream."""
