"""The reference notebook's run in Keras: the peer `lenet5 train` is measured against.

An optional peer, never a dependency of lenet5 nor part of CI: it needs TensorFlow, which
lenet5 does not use. Run it with an interpreter that has TensorFlow; it reads the same four
MNIST files lenet5 does (no download) and prints one JSON line:

    /path/to/tf-venv/bin/python benchmarks/peers/keras_lenet.py --data-dir ../shared/mnist

The model and training follow ../shared/docs/REFERENCE.md section 1 exactly: Conv2D 20@5x5 same,
ReLU, MaxPool, Conv2D 50@5x5 same, ReLU, MaxPool, Dense 500 ReLU, Dense 10 softmax (1,256,080
parameters), RMSprop with Keras' defaults, batch 32, 3 epochs, the test set as validation data.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path

STARTED = time.perf_counter()  # the process clock starts before TensorFlow is imported


def read_idx(path: Path, header: int):
    import numpy as np

    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with the four MNIST .gz files")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf
    from tensorflow import keras

    d = args.data_dir
    x_train = read_idx(d / "train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1).astype("float32") / 255
    y_train = keras.utils.to_categorical(read_idx(d / "train-labels-idx1-ubyte.gz", 8), 10)
    x_test = read_idx(d / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1).astype("float32") / 255
    y_test = keras.utils.to_categorical(read_idx(d / "t10k-labels-idx1-ubyte.gz", 8), 10)

    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(20, 5, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2, 2),
        keras.layers.Conv2D(50, 5, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2, 2),
        keras.layers.Flatten(),
        keras.layers.Dense(500, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.RMSprop(), loss="categorical_crossentropy", metrics=["accuracy"])
    fit_started = time.perf_counter()
    history = model.fit(x_train, y_train, batch_size=32, epochs=args.epochs, validation_data=(x_test, y_test),
                        verbose=0)
    fit_seconds = time.perf_counter() - fit_started
    print(json.dumps({
        "peer": "keras", "tensorflow": tf.__version__, "parameters": int(model.count_params()),
        "val_accuracy": [float(a) for a in history.history["val_accuracy"]],
        "train_accuracy": [float(a) for a in history.history["accuracy"]],
        "fit_seconds": fit_seconds, "process_seconds": time.perf_counter() - STARTED,
        "threads": os.cpu_count(), "numpy": np.__version__,
    }))


if __name__ == "__main__":
    main()
