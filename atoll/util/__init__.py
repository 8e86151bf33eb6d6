"""Small pieces every layer uses: atomic writes, safetensors state files, errors, hashing."""
