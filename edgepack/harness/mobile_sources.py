"""The Kotlin and Swift sources ``mobile.render`` writes; constants come from one bundle.

The code below is fixed; only the ``@@NAME@@`` markers change per bundle: the model signature
(input names, dtypes, shapes; output name, dtype, shape), the labels, the tokenizer settings, and
which task method (embed, classify or tag) is kept. ``mobile.WordPiece`` and
``mobile.run_like_app`` are the Python port of these sources: a change here must be made there.
Standard library only; Python 3.8+.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List

ROLE_FIELDS = {  # input role -> (Kotlin field, Swift field, padding value)
    "input_ids": ("ids", "ids", "tokenizer.padId"),
    "attention_mask": ("mask", "mask", "0"),
    "token_type_ids": ("typeIds", "typeIds", "0"),
}
WHITE_SPACE_LIST = (
    "0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, 0x2000, 0x2001, 0x2002, 0x2003, "
    "0x2004, 0x2005, 0x2006, 0x2007, 0x2008, 0x2009, 0x200A, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000"
)
CJK_LIST = (
    "0x4E00, 0x9FFF, 0x3400, 0x4DBF, 0x20000, 0x2A6DF, 0x2A700, 0x2B73F, 0x2B740, 0x2B81F, "
    "0x2B920, 0x2CEAF, 0xF900, 0xFAFF, 0x2F800, 0x2FA1F"
)
ASCII_PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def kt(text: str) -> str:
    """A Kotlin string literal."""
    out = []
    for ch in text:
        if ch in '\\"$':
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            data = ch.encode("utf-16-be")
            out.extend(
                "\\u{:02x}{:02x}".format(data[i], data[i + 1]) for i in range(0, len(data), 2)
            )
    return '"' + "".join(out) + '"'


def sw(text: str) -> str:
    """A Swift string literal."""
    out = []
    for ch in text:
        if ch in '\\"':
            out.append("\\" + ch)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            out.append("\\u{{{:x}}}".format(ord(ch)))
    return '"' + "".join(out) + '"'


def _sections(source: str, keep: List[str], drop: List[str]) -> str:
    """Keep the text between ``// <<name`` and ``// name>>`` for ``keep``, remove it for ``drop``."""
    for name in drop:
        source = re.sub(r"[ \t]*// <<{0}\n.*?// {0}>>\n".format(name), "", source, flags=re.S)
    for name in keep:
        source = re.sub(r"[ \t]*// (<<{0}|{0}>>)\n".format(name), "", source)
    return source


def _fill(source: str, marks: Dict[str, str]) -> str:
    for name, value in marks.items():
        source = source.replace("@@" + name + "@@", value)
    left = re.findall(r"@@[A-Z_]+@@", source)
    if left:
        raise ValueError("unfilled markers: {}".format(sorted(set(left))))
    return source


def _common(values: Dict[str, Any]) -> Dict[str, str]:
    manifest, sig = values["manifest"], values["sig"]
    spec = values["spec"]
    return {
        "EDGEPACK": str(manifest.get("versions", {}).get("edgepack", "?")),
        "ORT": str(manifest.get("versions", {}).get("onnxruntime", "?")),
        "BUNDLE": values["bundle"],
        "TASK": manifest["task"],
        "PRECISION": str(manifest["model"].get("precision", "?")),
        "MODEL_FILE": manifest["model"]["file"],
        "MAX_LENGTH": str(sig["max_length"]),
        "LOWERCASE": "true" if spec.get("lowercase") else "false",
        "STRIP_ACCENTS": "true" if spec.get("strip_accents") else "false",
        "CLEAN_TEXT": "true" if spec.get("clean_text") else "false",
        "CHINESE_CHARS": "true" if spec.get("chinese_chars") else "false",
        "MAX_CHARS": str(spec.get("max_chars", 100)),
        "WHITE_SPACE": WHITE_SPACE_LIST,
        "CJK": CJK_LIST,
    }


def _keep(values: Dict[str, Any]) -> Dict[str, List[str]]:
    kinds = ["embed", "classify", "tag"]
    return {"keep": [values["kind"]], "drop": [k for k in kinds if k != values["kind"]]}


def kotlin(values: Dict[str, Any]) -> str:
    sig, spec = values["sig"], values["spec"]
    inputs = sig["inputs"]
    marks = _common(values)
    marks.update(
        INPUT_NAMES=", ".join(kt(i["name"]) for i in inputs),
        INPUT_TYPES=", ".join(kt(i["dtype"]) for i in inputs),
        INPUT_SHAPES=", ".join(
            "longArrayOf({})".format(", ".join(str(d) for d in i["shape"])) for i in inputs
        ),
        OUTPUT_NAME=kt(sig["output"]["name"]),
        OUTPUT_TYPE=kt(sig["output"]["dtype"]),
        OUTPUT_SHAPE=", ".join(str(d) for d in sig["output"]["shape"]),
        LABELS=", ".join(kt(label) for label in values["labels"]),
        FEEDS="\n".join(
            "            BundleSignature.INPUT_NAMES[{n}] to tensor({n}, enc.{f}, {pad}, rows, "
            "length), // {role}".format(
                n=n, f=ROLE_FIELDS[i["role"]][0], pad=ROLE_FIELDS[i["role"]][2], role=i["role"]
            )
            for n, i in enumerate(inputs)
        ),
        UNK=kt(spec.get("unk", "")),
        CLS=kt(spec.get("cls", "")),
        SEP=kt(spec.get("sep", "")),
        PAD=kt(spec.get("pad", "")),
        PREFIX=kt(spec.get("prefix", "")),
        ADDED=", ".join(kt(a) for a in spec.get("added", [])),
        ASCII_PUNCTUATION=kt(ASCII_PUNCTUATION),
        PACKAGE="edgepack",
    )
    sections = _keep(values)
    return _fill(_sections(KOTLIN, sections["keep"], sections["drop"]), marks)


def swift(values: Dict[str, Any]) -> str:
    sig, spec = values["sig"], values["spec"]
    inputs = sig["inputs"]
    marks = _common(values)
    marks.update(
        INPUT_NAMES=", ".join(sw(i["name"]) for i in inputs),
        INPUT_TYPES=", ".join(sw(i["dtype"]) for i in inputs),
        INPUT_SHAPES=", ".join(
            "[{}]".format(", ".join(str(d) for d in i["shape"])) for i in inputs
        ),
        OUTPUT_NAME=sw(sig["output"]["name"]),
        OUTPUT_TYPE=sw(sig["output"]["dtype"]),
        OUTPUT_SHAPE=", ".join(str(d) for d in sig["output"]["shape"]),
        LABELS=", ".join(sw(label) for label in values["labels"]),
        FEEDS="\n".join(
            "            BundleSignature.inputNames[{n}]: try tensor({n}, enc.{f}, fill: {pad}, "
            "rows: rows, length: length), // {role}".format(
                n=n, f=ROLE_FIELDS[i["role"]][1], pad=ROLE_FIELDS[i["role"]][2], role=i["role"]
            )
            for n, i in enumerate(inputs)
        ),
        UNK=sw(spec.get("unk", "")),
        CLS=sw(spec.get("cls", "")),
        SEP=sw(spec.get("sep", "")),
        PAD=sw(spec.get("pad", "")),
        PREFIX=sw(spec.get("prefix", "")),
        ADDED=", ".join(sw(a) for a in spec.get("added", [])),
        ASCII_PUNCTUATION=sw(ASCII_PUNCTUATION),
    )
    sections = _keep(values)
    return _fill(_sections(SWIFT, sections["keep"], sections["drop"]), marks)


KOTLIN = r"""// EdgepackModel.kt: generated by edgepack @@EDGEPACK@@ for the bundle @@BUNDLE@@
// (@@TASK@@, @@PRECISION@@). BundleSignature holds this bundle's model signature from its
// manifest.json; edgepack's tests check every name, dtype and shape here against the model.
//
// Gradle:  implementation("com.microsoft.onnxruntime:onnxruntime-android:@@ORT@@")
// Copy @@MODEL_FILE@@ and tokenizer/vocab.txt from the bundle into app/src/main/assets/, then
// (off the main thread: loading and running take milliseconds to seconds):
//
//     val model = EdgepackModel(
//         assets.open("@@MODEL_FILE@@").readBytes(),
//         assets.open("vocab.txt").bufferedReader(Charsets.UTF_8).readLines(),
//     )
// <<embed
//     val vector: FloatArray = model.embed("where is my order?")
// embed>>
// <<classify
//     val result = model.classify("where is my order?")   // result.label, result.score
// classify>>
// <<tag
//     val tokens = model.tag("Ada lives in Paris")       // token, label, score per token
// tag>>
//     model.close()
package @@PACKAGE@@

import ai.onnxruntime.OnnxTensor
import ai.onnxruntime.OrtEnvironment
import ai.onnxruntime.OrtSession
import java.nio.IntBuffer
import java.nio.LongBuffer
import java.text.Normalizer
import java.util.Locale

/** The model's inputs and output as the bundle declares them; -1 is a dimension of any size. */
object BundleSignature {
    const val MODEL_FILE = "@@MODEL_FILE@@"
    const val TASK = "@@TASK@@"
    val INPUT_NAMES = arrayOf(@@INPUT_NAMES@@)
    val INPUT_TYPES = arrayOf(@@INPUT_TYPES@@)
    val INPUT_SHAPES = arrayOf(@@INPUT_SHAPES@@)
    const val OUTPUT_NAME = @@OUTPUT_NAME@@
    const val OUTPUT_TYPE = @@OUTPUT_TYPE@@
    val OUTPUT_SHAPE = longArrayOf(@@OUTPUT_SHAPE@@)
    const val MAX_LENGTH = @@MAX_LENGTH@@
    val LABELS = arrayOf<String>(@@LABELS@@)
}

/** One text as the model sees it: [CLS] tokens [SEP], cut to MAX_LENGTH, not padded. */
class Encoding(val ids: IntArray, val tokens: List<String>, val special: BooleanArray) {
    val mask = IntArray(ids.size) { 1 }
    val typeIds = IntArray(ids.size)
}

class Classification(val label: String, val score: Float, val scores: FloatArray)

class TaggedToken(val token: String, val label: String, val score: Float)

class EdgepackModel(modelBytes: ByteArray, vocabLines: List<String>) : AutoCloseable {
    private val env = OrtEnvironment.getEnvironment()
    private val session: OrtSession = env.createSession(modelBytes, OrtSession.SessionOptions())
    val tokenizer = WordPieceTokenizer(vocabLines)

    /** The primary output's values for this text (its first row) and their shape. */
    fun run(enc: Encoding): Pair<FloatArray, LongArray> {
        val fixedRows = BundleSignature.INPUT_SHAPES[0][0].toInt()
        val fixedLength = BundleSignature.INPUT_SHAPES[0][1].toInt()
        val rows = if (fixedRows > 0) fixedRows else 1
        val length = if (fixedLength > 0) fixedLength else enc.ids.size
        val feeds = mapOf(
@@FEEDS@@
        )
        try {
            session.run(feeds).use { result ->
                val output = result.get(BundleSignature.OUTPUT_NAME).get() as OnnxTensor
                val shape = output.info.shape
                val buffer = output.floatBuffer
                val row = FloatArray((buffer.remaining() / shape[0]).toInt())
                buffer.get(row)
                return Pair(row, shape.copyOfRange(1, shape.size))
            }
        } finally {
            feeds.values.forEach { it.close() }
        }
    }

    /** [rows, length] of the text's values (every row the same), padded with fill. */
    private fun tensor(input: Int, values: IntArray, fill: Int, rows: Int, length: Int): OnnxTensor {
        val shape = longArrayOf(rows.toLong(), length.toLong())
        val flat = IntArray(rows * length) { k ->
            val position = k % length
            if (position < values.size) values[position] else fill
        }
        if (BundleSignature.INPUT_TYPES[input] == "int64") {
            val longs = LongArray(flat.size) { flat[it].toLong() }
            return OnnxTensor.createTensor(env, LongBuffer.wrap(longs), shape)
        }
        return OnnxTensor.createTensor(env, IntBuffer.wrap(flat), shape)
    }
// <<embed

    /** The sentence embedding: the model's own pooling, or the mean of its token vectors. */
    fun embed(text: String): FloatArray {
        val enc = tokenizer.encode(text)
        val (values, shape) = run(enc)
        if (shape.size == 1) return values
        val hidden = shape[1].toInt()
        val pooled = FloatArray(hidden)
        for (t in enc.ids.indices) {
            for (h in 0 until hidden) pooled[h] += values[t * hidden + h]
        }
        for (h in 0 until hidden) pooled[h] /= enc.ids.size.toFloat()
        return pooled
    }
// embed>>
// <<classify

    /** The most likely label, its probability, and every label's probability. */
    fun classify(text: String): Classification {
        val (logits, _) = run(tokenizer.encode(text))
        val probs = softmax(logits, 0, logits.size)
        val best = argmax(probs)
        return Classification(label(best), probs[best], probs)
    }
// classify>>
// <<tag

    /** One label per token of the text ([CLS] and [SEP] left out). */
    fun tag(text: String): List<TaggedToken> {
        val enc = tokenizer.encode(text)
        val (logits, shape) = run(enc)
        val classes = shape[1].toInt()
        val tagged = ArrayList<TaggedToken>()
        for (t in enc.ids.indices) {
            if (enc.special[t]) continue
            val probs = softmax(logits, t * classes, classes)
            val best = argmax(probs)
            tagged.add(TaggedToken(enc.tokens[t], label(best), probs[best]))
        }
        return tagged
    }
// tag>>

    private fun label(index: Int): String =
        if (index < BundleSignature.LABELS.size) BundleSignature.LABELS[index] else "LABEL_$index"

    private fun argmax(values: FloatArray): Int {
        var best = 0
        for (k in values.indices) if (values[k] > values[best]) best = k
        return best
    }

    private fun softmax(values: FloatArray, offset: Int, count: Int): FloatArray {
        var max = Double.NEGATIVE_INFINITY
        for (k in 0 until count) max = maxOf(max, values[offset + k].toDouble())
        val exp = DoubleArray(count) { Math.exp(values[offset + it] - max) }
        val sum = exp.sum()
        return FloatArray(count) { (exp[it] / sum).toFloat() }
    }

    override fun close() {
        session.close()
    }
}

/** BERT WordPiece exactly as the bundle's tokenizer.json does it (see mobile.py's notes). */
class WordPieceTokenizer(vocabLines: List<String>) {
    private val vocab = HashMap<String, Int>()

    init {
        // A repeated line keeps its last index, as tokenizers does.
        for ((i, line) in vocabLines.withIndex()) vocab[line.trimEnd('\r')] = i
    }

    val padId: Int = vocab.getValue(PAD)

    companion object {
        const val LOWERCASE = @@LOWERCASE@@
        const val STRIP_ACCENTS = @@STRIP_ACCENTS@@
        const val CLEAN_TEXT = @@CLEAN_TEXT@@
        const val CHINESE_CHARS = @@CHINESE_CHARS@@
        const val MAX_CHARS = @@MAX_CHARS@@
        const val UNK = @@UNK@@
        const val CLS = @@CLS@@
        const val SEP = @@SEP@@
        const val PAD = @@PAD@@
        const val PREFIX = @@PREFIX@@
        val ADDED = arrayOf(@@ADDED@@)
        const val ASCII_PUNCTUATION = @@ASCII_PUNCTUATION@@
        private val WHITE_SPACE = intArrayOf(@@WHITE_SPACE@@)
        private val CJK = intArrayOf(@@CJK@@)
    }

    fun encode(text: String): Encoding {
        val tokens = tokenize(text)
        val kept = tokens.subList(0, minOf(tokens.size, maxOf(0, BundleSignature.MAX_LENGTH - 2)))
        val all = ArrayList<String>(kept.size + 2)
        all.add(CLS)
        all.addAll(kept)
        all.add(SEP)
        val special = BooleanArray(all.size) { it == 0 || it == all.size - 1 }
        return Encoding(IntArray(all.size) { vocab.getValue(all[it]) }, all, special)
    }

    fun tokenize(text: String): List<String> {
        val tokens = ArrayList<String>()
        for ((part, isAdded) in splitAdded(text)) {
            if (isAdded) {
                tokens.add(part)
                continue
            }
            for (word in preTokenize(normalize(part))) wordPieces(word, tokens)
        }
        return tokens
    }

    /** Special tokens written in the text stay whole: leftmost, then longest, match. */
    private fun splitAdded(text: String): List<Pair<String, Boolean>> {
        val parts = ArrayList<Pair<String, Boolean>>()
        var start = 0
        var i = 0
        while (i < text.length) {
            var match = ""
            for (token in ADDED) {
                if (token.length > match.length && text.startsWith(token, i)) match = token
            }
            if (match.isNotEmpty()) {
                if (i > start) parts.add(Pair(text.substring(start, i), false))
                parts.add(Pair(match, true))
                i += match.length
                start = i
            } else {
                i += 1
            }
        }
        if (start < text.length) parts.add(Pair(text.substring(start), false))
        return parts
    }

    private fun codePoints(text: String): IntArray {
        val out = ArrayList<Int>(text.length)
        var i = 0
        while (i < text.length) {
            val cp = text.codePointAt(i)
            out.add(cp)
            i += Character.charCount(cp)
        }
        return out.toIntArray()
    }

    fun normalize(text: String): String {
        val sb = StringBuilder()
        for (original in codePoints(text)) {
            var cp = original
            if (CLEAN_TEXT) {
                if (cp == 0 || cp == 0xFFFD || isControl(cp)) continue
                if (isWhiteSpace(cp)) cp = 0x20
            }
            if (CHINESE_CHARS && isCjk(cp)) {
                sb.append(' ').appendCodePoint(cp).append(' ')
            } else {
                sb.appendCodePoint(cp)
            }
        }
        var out = sb.toString()
        if (STRIP_ACCENTS) {
            val kept = StringBuilder()
            for (cp in codePoints(Normalizer.normalize(out, Normalizer.Form.NFD))) {
                if (Character.getType(cp) != Character.NON_SPACING_MARK.toInt()) kept.appendCodePoint(cp)
            }
            out = kept.toString()
        }
        if (LOWERCASE) {
            // One code point at a time, as tokenizers does: no final-sigma rule.
            val lower = StringBuilder()
            for (cp in codePoints(out)) lower.append(String(Character.toChars(cp)).lowercase(Locale.ROOT))
            out = lower.toString()
        }
        return out
    }

    private fun preTokenize(text: String): List<String> {
        val words = ArrayList<String>()
        val current = StringBuilder()
        for (cp in codePoints(text)) {
            if (isWhiteSpace(cp) || isPunctuation(cp)) {
                if (current.isNotEmpty()) {
                    words.add(current.toString())
                    current.setLength(0)
                }
                if (!isWhiteSpace(cp)) words.add(String(Character.toChars(cp)))
            } else {
                current.appendCodePoint(cp)
            }
        }
        if (current.isNotEmpty()) words.add(current.toString())
        return words
    }

    private fun wordPieces(word: String, out: MutableList<String>) {
        val chars = codePoints(word)
        if (chars.size > MAX_CHARS) {
            out.add(UNK)
            return
        }
        val pieces = ArrayList<String>()
        var start = 0
        while (start < chars.size) {
            var end = chars.size
            var found: String? = null
            while (start < end) {
                var piece = String(chars, start, end - start)
                if (start > 0) piece = PREFIX + piece
                if (vocab.containsKey(piece)) {
                    found = piece
                    break
                }
                end -= 1
            }
            if (found == null) {
                out.add(UNK)
                return
            }
            pieces.add(found)
            start = end
        }
        out.addAll(pieces)
    }

    private fun isWhiteSpace(cp: Int): Boolean = WHITE_SPACE.contains(cp)

    private fun isControl(cp: Int): Boolean {
        if (cp == 0x09 || cp == 0x0A || cp == 0x0D) return false
        return when (Character.getType(cp)) {
            Character.CONTROL.toInt(), Character.FORMAT.toInt(),
            Character.PRIVATE_USE.toInt(), Character.SURROGATE.toInt() -> true
            else -> false
        }
    }

    private fun isCjk(cp: Int): Boolean {
        for (k in CJK.indices step 2) if (cp >= CJK[k] && cp <= CJK[k + 1]) return true
        return false
    }

    private fun isPunctuation(cp: Int): Boolean {
        if (cp < 128) return ASCII_PUNCTUATION.indexOf(cp.toChar()) >= 0
        return when (Character.getType(cp)) {
            Character.CONNECTOR_PUNCTUATION.toInt(), Character.DASH_PUNCTUATION.toInt(),
            Character.START_PUNCTUATION.toInt(), Character.END_PUNCTUATION.toInt(),
            Character.INITIAL_QUOTE_PUNCTUATION.toInt(), Character.FINAL_QUOTE_PUNCTUATION.toInt(),
            Character.OTHER_PUNCTUATION.toInt() -> true
            else -> false
        }
    }
}
"""

SWIFT = r"""// EdgepackModel.swift: generated by edgepack @@EDGEPACK@@ for the bundle @@BUNDLE@@
// (@@TASK@@, @@PRECISION@@). BundleSignature holds this bundle's model signature from its
// manifest.json; edgepack's tests check every name, dtype and shape here against the model.
//
// CocoaPods:  pod 'onnxruntime-objc', '~> @@ORT@@'
// Add @@MODEL_FILE@@ and tokenizer/vocab.txt from the bundle to the app target, then (off the main
// thread: loading and running take milliseconds to seconds):
//
//     let model = try EdgepackModel(
//         modelPath: Bundle.main.path(forResource: "model", ofType: "ort")!,
//         vocabPath: Bundle.main.path(forResource: "vocab", ofType: "txt")!)
// <<embed
//     let vector: [Float] = try model.embed("where is my order?")
// embed>>
// <<classify
//     let result = try model.classify("where is my order?")   // result.label, result.score
// classify>>
// <<tag
//     let tokens = try model.tag("Ada lives in Paris")        // token, label, score per token
// tag>>

import Foundation
import onnxruntime_objc

/// The model's inputs and output as the bundle declares them; -1 is a dimension of any size.
enum BundleSignature {
    static let modelFile = "@@MODEL_FILE@@"
    static let task = "@@TASK@@"
    static let inputNames: [String] = [@@INPUT_NAMES@@]
    static let inputTypes: [String] = [@@INPUT_TYPES@@]
    static let inputShapes: [[Int]] = [@@INPUT_SHAPES@@]
    static let outputName = @@OUTPUT_NAME@@
    static let outputType = @@OUTPUT_TYPE@@
    static let outputShape: [Int] = [@@OUTPUT_SHAPE@@]
    static let maxLength = @@MAX_LENGTH@@
    static let labels: [String] = [@@LABELS@@]
}

/// One text as the model sees it: [CLS] tokens [SEP], cut to maxLength, not padded.
struct Encoding {
    let ids: [Int]
    let tokens: [String]
    let special: [Bool]
    var mask: [Int] { return [Int](repeating: 1, count: ids.count) }
    var typeIds: [Int] { return [Int](repeating: 0, count: ids.count) }
}

struct Classification {
    let label: String
    let score: Float
    let scores: [Float]
}

struct TaggedToken {
    let token: String
    let label: String
    let score: Float
}

enum EdgepackError: Error {
    case missingOutput(String)
    case badVocabulary(String)
}

final class EdgepackModel {
    private let env: ORTEnv
    private let session: ORTSession
    let tokenizer: WordPieceTokenizer

    init(modelPath: String, vocabPath: String) throws {
        env = try ORTEnv(loggingLevel: ORTLoggingLevel.warning)
        session = try ORTSession(env: env, modelPath: modelPath, sessionOptions: nil)
        tokenizer = try WordPieceTokenizer(vocabPath: vocabPath)
    }

    /// The primary output's values for this text (its first row) and their shape.
    func run(_ enc: Encoding) throws -> (values: [Float], shape: [Int]) {
        let fixedRows = BundleSignature.inputShapes[0][0]
        let fixedLength = BundleSignature.inputShapes[0][1]
        let rows = fixedRows > 0 ? fixedRows : 1
        let length = fixedLength > 0 ? fixedLength : enc.ids.count
        let feeds: [String: ORTValue] = [
@@FEEDS@@
        ]
        let outputs = try session.run(
            withInputs: feeds, outputNames: [BundleSignature.outputName], runOptions: nil)
        guard let output = outputs[BundleSignature.outputName] else {
            throw EdgepackError.missingOutput(BundleSignature.outputName)
        }
        let shape = try output.tensorTypeAndShapeInfo().shape.map { $0.intValue }
        let data = try output.tensorData() as Data
        let all: [Float] = data.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
        return (Array(all[0..<(all.count / shape[0])]), Array(shape.dropFirst()))
    }

    /// [rows, length] of the text's values (every row the same), padded with fill.
    private func tensor(_ input: Int, _ values: [Int], fill: Int, rows: Int, length: Int) throws -> ORTValue {
        let shape: [NSNumber] = [NSNumber(value: rows), NSNumber(value: length)]
        var flat = [Int](repeating: fill, count: rows * length)
        for row in 0..<rows {
            for position in 0..<min(length, values.count) { flat[row * length + position] = values[position] }
        }
        if BundleSignature.inputTypes[input] == "int64" {
            var typed = flat.map { Int64($0) }
            let data = NSMutableData(bytes: &typed, length: typed.count * MemoryLayout<Int64>.stride)
            return try ORTValue(tensorData: data, elementType: ORTTensorElementDataType.int64, shape: shape)
        }
        var typed = flat.map { Int32($0) }
        let data = NSMutableData(bytes: &typed, length: typed.count * MemoryLayout<Int32>.stride)
        return try ORTValue(tensorData: data, elementType: ORTTensorElementDataType.int32, shape: shape)
    }
// <<embed

    /// The sentence embedding: the model's own pooling, or the mean of its token vectors.
    func embed(_ text: String) throws -> [Float] {
        let enc = tokenizer.encode(text)
        let (values, shape) = try run(enc)
        if shape.count == 1 { return values }
        let hidden = shape[1]
        var pooled = [Float](repeating: 0, count: hidden)
        for t in 0..<enc.ids.count {
            for h in 0..<hidden { pooled[h] += values[t * hidden + h] }
        }
        return pooled.map { $0 / Float(enc.ids.count) }
    }
// embed>>
// <<classify

    /// The most likely label, its probability, and every label's probability.
    func classify(_ text: String) throws -> Classification {
        let (logits, _) = try run(tokenizer.encode(text))
        let probs = softmax(logits, offset: 0, count: logits.count)
        let best = argmax(probs)
        return Classification(label: label(best), score: probs[best], scores: probs)
    }
// classify>>
// <<tag

    /// One label per token of the text ([CLS] and [SEP] left out).
    func tag(_ text: String) throws -> [TaggedToken] {
        let enc = tokenizer.encode(text)
        let (logits, shape) = try run(enc)
        let classes = shape[1]
        var tagged: [TaggedToken] = []
        for t in 0..<enc.ids.count where !enc.special[t] {
            let probs = softmax(logits, offset: t * classes, count: classes)
            let best = argmax(probs)
            tagged.append(TaggedToken(token: enc.tokens[t], label: label(best), score: probs[best]))
        }
        return tagged
    }
// tag>>

    private func label(_ index: Int) -> String {
        return index < BundleSignature.labels.count ? BundleSignature.labels[index] : "LABEL_\(index)"
    }

    private func argmax(_ values: [Float]) -> Int {
        var best = 0
        for k in 0..<values.count where values[k] > values[best] { best = k }
        return best
    }

    private func softmax(_ values: [Float], offset: Int, count: Int) -> [Float] {
        var top = -Double.infinity
        for k in 0..<count { top = max(top, Double(values[offset + k])) }
        let exp = (0..<count).map { Foundation.exp(Double(values[offset + $0]) - top) }
        let sum = exp.reduce(0, +)
        return exp.map { Float($0 / sum) }
    }
}

/// BERT WordPiece exactly as the bundle's tokenizer.json does it (see mobile.py's notes).
/// Words are arrays of Unicode scalar values, so lookups compare code points, not Swift's
/// canonically-equivalent Strings.
final class WordPieceTokenizer {
    typealias Scalars = [UInt32]
    static let lowercase = @@LOWERCASE@@
    static let stripAccents = @@STRIP_ACCENTS@@
    static let cleanText = @@CLEAN_TEXT@@
    static let chineseChars = @@CHINESE_CHARS@@
    static let maxChars = @@MAX_CHARS@@
    static let unk = @@UNK@@
    static let cls = @@CLS@@
    static let sep = @@SEP@@
    static let pad = @@PAD@@
    static let prefix = @@PREFIX@@
    static let added: [String] = [@@ADDED@@]
    static let asciiPunctuation = @@ASCII_PUNCTUATION@@
    static let whiteSpace: Set<UInt32> = [@@WHITE_SPACE@@]
    static let cjk: [UInt32] = [@@CJK@@]

    private var vocab: [Scalars: Int] = [:]
    private var tokens: [Int: String] = [:]
    let padId: Int

    init(vocabPath: String) throws {
        let text = try String(contentsOfFile: vocabPath, encoding: .utf8)
        var lines = text.unicodeScalars.split(separator: "\n", omittingEmptySubsequences: false)
        if let last = lines.last, last.isEmpty { lines.removeLast() }
        for (i, line) in lines.enumerated() {
            var key = line.map { $0.value }
            if key.last == 0x0D { key.removeLast() }
            vocab[key] = i  // a repeated line keeps its last index, as tokenizers does
        }
        for (key, id) in vocab { tokens[id] = WordPieceTokenizer.string(key) }
        guard let pad = vocab[WordPieceTokenizer.scalars(WordPieceTokenizer.pad)] else {
            throw EdgepackError.badVocabulary("vocab.txt has no \(WordPieceTokenizer.pad)")
        }
        padId = pad
    }

    static func scalars(_ text: String) -> Scalars { return text.unicodeScalars.map { $0.value } }

    static func string(_ scalars: Scalars) -> String {
        var view = String.UnicodeScalarView()
        for value in scalars { if let s = Unicode.Scalar(value) { view.append(s) } }
        return String(view)
    }

    func encode(_ text: String) -> Encoding {
        let pieces = tokenize(text)
        let kept = Array(pieces.prefix(max(0, BundleSignature.maxLength - 2)))
        let all = [WordPieceTokenizer.scalars(WordPieceTokenizer.cls)] + kept
            + [WordPieceTokenizer.scalars(WordPieceTokenizer.sep)]
        let ids = all.map { vocab[$0]! }
        let special = (0..<all.count).map { $0 == 0 || $0 == all.count - 1 }
        return Encoding(ids: ids, tokens: ids.map { tokens[$0]! }, special: special)
    }

    func tokenize(_ text: String) -> [Scalars] {
        var out: [Scalars] = []
        for (part, isAdded) in splitAdded(WordPieceTokenizer.scalars(text)) {
            if isAdded {
                out.append(part)
                continue
            }
            for word in preTokenize(normalize(part)) { wordPieces(word, &out) }
        }
        return out
    }

    /// Special tokens written in the text stay whole: leftmost, then longest, match.
    private func splitAdded(_ text: Scalars) -> [(Scalars, Bool)] {
        let added = WordPieceTokenizer.added.map { WordPieceTokenizer.scalars($0) }
        var parts: [(Scalars, Bool)] = []
        var start = 0
        var i = 0
        while i < text.count {
            var match: Scalars = []
            for token in added where token.count > match.count && i + token.count <= text.count {
                if Array(text[i..<(i + token.count)]) == token { match = token }
            }
            if !match.isEmpty {
                if i > start { parts.append((Array(text[start..<i]), false)) }
                parts.append((match, true))
                i += match.count
                start = i
            } else {
                i += 1
            }
        }
        if start < text.count { parts.append((Array(text[start...]), false)) }
        return parts
    }

    func normalize(_ text: Scalars) -> Scalars {
        var out: Scalars = []
        for original in text {
            var cp = original
            if WordPieceTokenizer.cleanText {
                if cp == 0 || cp == 0xFFFD || isControl(cp) { continue }
                if WordPieceTokenizer.whiteSpace.contains(cp) { cp = 0x20 }
            }
            if WordPieceTokenizer.chineseChars && isCjk(cp) {
                out += [0x20, cp, 0x20]
            } else {
                out.append(cp)
            }
        }
        if WordPieceTokenizer.stripAccents {
            let nfd = WordPieceTokenizer.string(out).decomposedStringWithCanonicalMapping
            out = nfd.unicodeScalars.filter { $0.properties.generalCategory != .nonspacingMark }.map { $0.value }
        }
        if WordPieceTokenizer.lowercase {
            // One code point at a time, as tokenizers does: no final-sigma rule.
            out = out.flatMap { WordPieceTokenizer.scalars(WordPieceTokenizer.string([$0]).lowercased()) }
        }
        return out
    }

    private func preTokenize(_ text: Scalars) -> [Scalars] {
        var words: [Scalars] = []
        var current: Scalars = []
        for cp in text {
            let space = WordPieceTokenizer.whiteSpace.contains(cp)
            if space || isPunctuation(cp) {
                if !current.isEmpty {
                    words.append(current)
                    current = []
                }
                if !space { words.append([cp]) }
            } else {
                current.append(cp)
            }
        }
        if !current.isEmpty { words.append(current) }
        return words
    }

    private func wordPieces(_ word: Scalars, _ out: inout [Scalars]) {
        let unk = WordPieceTokenizer.scalars(WordPieceTokenizer.unk)
        if word.count > WordPieceTokenizer.maxChars {
            out.append(unk)
            return
        }
        let prefix = WordPieceTokenizer.scalars(WordPieceTokenizer.prefix)
        var pieces: [Scalars] = []
        var start = 0
        while start < word.count {
            var end = word.count
            var found: Scalars? = nil
            while start < end {
                var piece = Array(word[start..<end])
                if start > 0 { piece = prefix + piece }
                if vocab[piece] != nil {
                    found = piece
                    break
                }
                end -= 1
            }
            guard let piece = found else {
                out.append(unk)
                return
            }
            pieces.append(piece)
            start = end
        }
        out += pieces
    }

    private func category(_ cp: UInt32) -> Unicode.GeneralCategory {
        return Unicode.Scalar(cp)?.properties.generalCategory ?? .surrogate
    }

    private func isControl(_ cp: UInt32) -> Bool {
        if cp == 0x09 || cp == 0x0A || cp == 0x0D { return false }
        switch category(cp) {
        case .control, .format, .privateUse, .surrogate: return true
        default: return false
        }
    }

    private func isCjk(_ cp: UInt32) -> Bool {
        let ranges = WordPieceTokenizer.cjk
        for k in stride(from: 0, to: ranges.count, by: 2) where cp >= ranges[k] && cp <= ranges[k + 1] {
            return true
        }
        return false
    }

    private func isPunctuation(_ cp: UInt32) -> Bool {
        if cp < 128 { return WordPieceTokenizer.asciiPunctuation.unicodeScalars.contains { $0.value == cp } }
        switch category(cp) {
        case .connectorPunctuation, .dashPunctuation, .openPunctuation, .closePunctuation,
             .initialPunctuation, .finalPunctuation, .otherPunctuation: return true
        default: return false
        }
    }
}
"""
