"""Bad conversion input: a one-line error naming the file or key, and a non-zero exit."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxtele.convert import load_pretrained
from jaxtele.errors import JaxteleError


def run_cli(*args):
  r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)
  lines = r.stderr.strip().splitlines()
  return r.returncode, lines[-1] if lines else "", len(lines)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, make_hf_model):
  d = tmp_path_factory.mktemp("hf")
  make_hf_model("llama_untied").save_pretrained(d)
  return str(d)


def export_error(source, tmp_path):
  rc, err, n = run_cli("jaxtele.export", "--source", source, "--out", str(tmp_path / "out"))
  assert rc == 2 and n == 1 and err.startswith("error: "), (rc, err)
  assert not (tmp_path / "out").exists()
  return err


def test_missing_folder(tmp_path):
  assert "no such model folder" in export_error(str(tmp_path / "nope"), tmp_path)


def test_missing_weights(hf_folder, tmp_path):
  d = tmp_path / "noweights"
  d.mkdir()
  (d / "config.json").write_text(open(os.path.join(hf_folder, "config.json")).read())
  assert "model.safetensors" in export_error(str(d), tmp_path)


def test_missing_gguf(tmp_path):
  assert "no such GGUF file" in export_error(str(tmp_path / "x.gguf"), tmp_path)


def test_unsupported_architecture(hf_folder, tmp_path):
  d = tmp_path / "gpt2"
  d.mkdir()
  cfg = json.load(open(os.path.join(hf_folder, "config.json"))) | {"model_type": "gpt2"}
  (d / "config.json").write_text(json.dumps(cfg))
  err = export_error(str(d), tmp_path)
  assert "config.json" in err and "unsupported model_type 'gpt2'" in err


def test_malformed_config(tmp_path):
  d = tmp_path / "bad"
  d.mkdir()
  (d / "config.json").write_text('{"model_type": "llama",\n  oops}')
  assert "config.json:2: malformed JSON" in export_error(str(d), tmp_path)


def test_tensor_of_wrong_shape(hf_folder, tmp_path):
  d = tmp_path / "shape"
  d.mkdir()
  for f in os.listdir(hf_folder):
    os.symlink(os.path.join(hf_folder, f), d / f)
  os.unlink(d / "config.json")
  cfg = json.load(open(os.path.join(hf_folder, "config.json"))) | {"intermediate_size": 80}
  (d / "config.json").write_text(json.dumps(cfg))
  err = export_error(str(d), tmp_path)
  assert "model.layers.0.mlp.down_proj.weight" in err and "[64, 96]" in err and "[64, 80]" in err


def test_gguf_of_another_architecture(tmp_path):
  import gguf

  path = str(tmp_path / "gpt2.gguf")
  w = gguf.GGUFWriter(path, "gpt2")
  w.add_block_count(1)
  w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  err = export_error(path, tmp_path)
  assert "gpt2.gguf" in err and "architecture 'gpt2' is not supported" in err


def test_token_ids_out_of_vocab(hf_folder):
  rc, err, n = run_cli("jaxtele.eval.generate", "--model", hf_folder, "--ids", "1,5,97")
  assert rc == 2 and n == 1 and "token id 97" in err and "[0, 97)" in err
  from jaxtele.models.decoder import check_token_ids

  with pytest.raises(JaxteleError, match=r"token id -1 at index \(0, 2\) is outside the vocabulary \[0, 97\)"):
    check_token_ids(np.array([[1, 2, -1, 3, 4]]), load_pretrained(hf_folder).model.config.vocab_size)


def test_existing_output_is_not_overwritten(hf_folder, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("precious")
  rc, err, _ = run_cli("jaxtele.export", "--source", hf_folder, "--out", str(out))
  assert rc == 2 and "already exists" in err
  assert (out / "keep.txt").read_text() == "precious"
  rc, _, _ = run_cli("jaxtele.export", "--source", hf_folder, "--out", str(out), "--overwrite")
  assert rc == 0 and (out / "model.safetensors").exists() and not (out / "keep.txt").exists()
