"""The peer server's side of bench/peer_server.py: a minimal MLServer custom runtime that runs the
same *dense* torch model our server is compared with. Imported by MLServer (1.7, in its own venv),
never by the engine.

- kind "mlp": a ReLU MLP rebuilt from a plain state dict (`uri`: the .pt file, weights_only),
  input "input" FP32 [rows, features] -> output "output".
- kind "minilm": a Hugging Face BERT folder (`uri`) through transformers' AutoModel and the
  folder's tokenizer; input "text" BYTES [rows] -> output "embedding" FP32 [rows, hidden]: mean
  pooling over the attention mask, L2-normalised (what sentence-transformers and our server do).
"""
from __future__ import annotations

import numpy as np
import torch
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.types import InferenceRequest, InferenceResponse


class DenseTorch(MLModel):
    async def load(self) -> bool:
        extra = self.settings.parameters.extra or {}
        self.kind, uri = extra["kind"], self.settings.parameters.uri
        torch.set_num_threads(int(extra.get("threads", torch.get_num_threads())))
        if self.kind == "mlp":
            state = torch.load(uri, weights_only=True)
            weights = [k for k in state if k.endswith(".weight")]
            layers = []
            for i, name in enumerate(weights):
                w = state[name]
                linear = torch.nn.Linear(w.shape[1], w.shape[0])
                linear.load_state_dict({"weight": w, "bias": state[name[:-len("weight")] + "bias"]})
                layers += [linear] + ([torch.nn.ReLU()] if i < len(weights) - 1 else [])
            self.model = torch.nn.Sequential(*layers).eval()
        else:
            from transformers import AutoModel, AutoTokenizer
            self.tokenizer = AutoTokenizer.from_pretrained(uri)
            self.model = AutoModel.from_pretrained(uri).eval()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        with torch.inference_mode():
            if self.kind == "mlp":
                x = torch.from_numpy(NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32))
                out = NumpyCodec.encode_output("output", self.model(x).numpy())
            else:
                texts = StringCodec.decode_input(payload.inputs[0])
                tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
                hidden = self.model(**tokens).last_hidden_state
                mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out = NumpyCodec.encode_output("embedding", torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return InferenceResponse(model_name=self.name, outputs=[out])
