// bertforge's onnxruntime-web probe: the top-1 token at each given position, per model, on the wasm backend.
// node top1.mjs INPUTS.json OUTPUT.json MODEL.onnx...   (INPUTS: [{"ids": [...], "pos": [...]}, ...])
import * as ort from "onnxruntime-web";
import fs from "fs";

ort.env.wasm.numThreads = 1;  // Node runs wasm without worker threads
// float16 logits (an fp16 variant without float32 io) come as raw bits in a Uint16Array where the runtime has
// no Float16Array (Node 20): compared as integers, every negative value would rank above every positive one
const half = (h) => {
  const sign = h & 0x8000 ? -1 : 1, exponent = (h >> 10) & 0x1f, fraction = h & 0x3ff;
  if (exponent === 0) return sign * fraction * 2 ** -24;
  if (exponent === 31) return fraction ? NaN : sign * Infinity;
  return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
};
const floats = (tensor) => tensor.type === "float16" && tensor.data instanceof Uint16Array
  ? Float32Array.from(tensor.data, half) : tensor.data;
const [inputs, output, ...models] = process.argv.slice(2);
const examples = JSON.parse(fs.readFileSync(inputs, "utf8"));
const result = { runtime: `onnxruntime-web ${ort.env.versions.web} wasm, Node ${process.versions.node}`, top1: {} };
for (const model of models) {
  const session = await ort.InferenceSession.create(fs.readFileSync(model), { executionProviders: ["wasm"] });
  const top = [];
  for (const example of examples) {
    const n = example.ids.length;
    const tensor = (values) => new ort.Tensor("int64", BigInt64Array.from(values.map(BigInt)), [1, n]);
    const all = { input_ids: tensor(example.ids), attention_mask: tensor(example.ids.map(() => 1)),
                  token_type_ids: tensor(example.ids.map(() => 0)) };
    const feeds = {};
    for (const name of session.inputNames) feeds[name] = all[name];
    const logits = (await session.run(feeds, ["logits"])).logits;
    const vocab = logits.dims[2], data = floats(logits);
    for (const position of example.pos) {
      let best = 0, value = -Infinity;
      for (let v = 0; v < vocab; v++) {
        const x = data[position * vocab + v];
        if (x > value) { value = x; best = v; }  // the first of equal maxima, as numpy's argmax
      }
      top.push(best);
    }
  }
  result.top1[model] = top;
  await session.release();
}
fs.writeFileSync(output, JSON.stringify(result));
