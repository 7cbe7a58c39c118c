// Calls pagoda's public streaming Generate with token ids and prints one JSON line:
// {"token_ids": [...], "text": "...", "finish_reason": "...", "usage": {...}}.
//   node generate.js HOST:PORT '{"token_ids": [...], "max_tokens": 8}'
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const protoRoot = path.resolve(__dirname, "../../../proto");
const definition = protoLoader.loadSync("pagoda/v1/api.proto", {
  includeDirs: [protoRoot],
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const pagoda = grpc.loadPackageDefinition(definition).pagoda.v1;

const [address, requestJson] = process.argv.slice(2);
const request = JSON.parse(requestJson);
const client = new pagoda.Generation(address, grpc.credentials.createInsecure());
const call = client.Generate({
  token_ids: { ids: request.token_ids },
  sampling: { temperature: 0, max_tokens: request.max_tokens, ignore_eos: true },
  return_token_ids: true,
});
const tokenIds = [];
let text = "";
let finishReason = null;
let usage = null;
call.on("data", (response) => {
  for (const choice of response.choices) {
    tokenIds.push(...choice.token_ids);
    text += choice.text;
    if (choice.finish_reason && choice.finish_reason !== "FINISH_REASON_NONE") {
      finishReason = choice.finish_reason;
    }
  }
  if (response.usage) usage = response.usage;
});
call.on("error", (err) => {
  console.error(`Generate failed: ${err.code} ${err.details}`);
  process.exit(1);
});
call.on("end", () => {
  console.log(JSON.stringify({ token_ids: tokenIds, text, finish_reason: finishReason, usage }));
  client.close();
});
