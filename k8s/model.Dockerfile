# The model as an image of its own, for the init container that copies it into
# the pod (k8s/base/deployment.yaml). Build it next to the file that
# scripts/fetch-model.sh extracts:
#   cp ~/.cache/retune/models/SmolLM2-135M-Instruct.Q4_1.gguf k8s/
#   docker build -f k8s/model.Dockerfile -t retune-model k8s/
FROM debian:bookworm-slim
COPY SmolLM2-135M-Instruct.Q4_1.gguf /model/
USER 10001:10001
