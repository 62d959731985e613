# Sourced by the scripts that run our binaries on the GPU host: puts the cuDNN of the host's torch
# wheel (nvidia-cudnn) on the library path, so that Hopper runs attention as a user with cuDNN
# installed would (src/backend/cuda/cudnn.rs). Without that wheel nothing changes.
if CUDNN_LIB=$(python3 -c 'import nvidia.cudnn as c, os; print(os.path.join(list(c.__path__)[0], "lib"))' 2>/dev/null); then
  export LD_LIBRARY_PATH="$CUDNN_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
