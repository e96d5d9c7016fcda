//! The bad-input battery: crafted hostile requests on every route, each answered with a 4xx
//! problem whose detail names what was wrong. Afterwards the server is still ready, its memory
//! stayed bounded and its log holds no panic. Extends the smaller battery in tests/server.rs.

mod common;

use common::{b64, encode_png, fixtures, png, start, tiny_flags, Server, TVS, TV_NAMES};
use reqwest::blocking::multipart::{Form, Part};
use reqwest::blocking::RequestBuilder;
use reqwest::Method;
use serde_json::{json, Value};

const CLASSES: [&str; 3] = ["cat", "dog", "bird"];

/// Sends crafted requests and records every answer that was not the expected refusal, so one
/// run reports all of them.
struct Battery<'a> {
    s: &'a Server,
    tried: usize,
    wrong: Vec<String>,
}

impl Battery<'_> {
    fn send(
        &mut self,
        what: &str,
        method: Method,
        path: &str,
        f: impl FnOnce(RequestBuilder) -> RequestBuilder,
        code: u16,
        needle: &str,
    ) {
        self.tried += 1;
        let r =
            f(reqwest::blocking::Client::new().request(method, format!("{}{path}", self.s.base)))
                .send()
                .unwrap();
        let status = r.status().as_u16();
        let ctype = common::content_type(&r);
        let v: Value = r.json().unwrap_or(Value::Null);
        let detail = v["detail"].as_str().unwrap_or("");
        let problem = ctype == "application/problem+json" && v["status"] == json!(status);
        if status != code || !problem || !detail.contains(needle) {
            let short: String = detail.chars().take(300).collect();
            self.wrong.push(format!(
                "{what}: {status} {ctype} {short:?} (wanted {code} naming {needle:?})"
            ));
        }
    }

    fn json(&mut self, what: &str, path: &str, body: Value, code: u16, needle: &str) {
        self.send(what, Method::POST, path, |r| r.json(&body), code, needle);
    }

    fn raw(&mut self, what: &str, path: &str, ctype: &str, body: Vec<u8>, needle: &str) {
        let ctype = ctype.to_string();
        self.send(
            what,
            Method::POST,
            path,
            |r| r.header("content-type", ctype).body(body),
            400,
            needle,
        );
    }

    fn form(&mut self, what: &str, path: &str, form: Form, needle: &str) {
        self.send(what, Method::POST, path, |r| r.multipart(form), 400, needle);
    }

    fn read(&mut self, what: &str, method: Method, path: &str, code: u16, needle: &str) {
        self.send(what, method, path, |r| r, code, needle);
    }
}

fn jpeg(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 99]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

fn webp(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, 7, y as u8]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::WebP).unwrap();
    out.into_inner()
}

/// A PNG whose IHDR claims `w`x`h` with a correct CRC, followed by a tiny IDAT: the header
/// alone looks valid.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 == 1 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A baseline JPEG whose SOF0 frame header claims `w`x`h`.
fn jpeg_claiming(w: u16, h: u16) -> Vec<u8> {
    let mut b = jpeg(8, 8);
    let sof = b.windows(2).position(|p| p == [0xff, 0xc0]).unwrap();
    b[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    b[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    b
}

/// The fixture task vector's safetensors header (JSON) and data.
fn fixture_tv() -> (serde_json::Map<String, Value>, Vec<u8>) {
    let b = std::fs::read(fixtures().join(TVS[0])).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    (header.as_object().unwrap().clone(), b[8 + n..].to_vec())
}

fn safetensors(header: &serde_json::Map<String, Value>, data: &[u8]) -> Vec<u8> {
    let h = serde_json::to_vec(header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// The fixture task vector with one edit to the entry of its first tensor.
fn tv_with(edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let (mut header, data) = fixture_tv();
    let first = header
        .keys()
        .find(|k| *k != "__metadata__")
        .unwrap()
        .clone();
    edit(header.get_mut(&first).unwrap());
    safetensors(&header, &data)
}

fn with(mut base: Value, extra: Value) -> Value {
    base.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    base
}

fn rss_bytes(s: &Server) -> f64 {
    s.metrics()
        .lines()
        .find(|l| l.starts_with("process_resident_memory_bytes "))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn crafted_bad_input_on_every_route_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tv_dir = dir.path().join("library");
    std::fs::create_dir(&tv_dir).unwrap();
    let outside = dir.path().join("outside.safetensors");
    std::fs::copy(fixtures().join(TVS[0]), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, tv_dir.join("link.safetensors")).unwrap();
    let mut flags = tiny_flags();
    flags.extend(
        ["--max-body-mib", "4", "--tv-dir", tv_dir.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string()),
    );
    let s = start(&dir.path().join("data"), &flags, &[("HF_HUB_OFFLINE", "1")]);
    // Warm up once so the memory baseline includes the loaded model and a first forward pass.
    let ok = b64(&png(1));
    let (code, _) = s.post("/classify", &json!({"classes": CLASSES, "images": [ok]}));
    assert_eq!(code, 200);
    let rss_before = rss_bytes(&s);

    let mut b = Battery {
        s: &s,
        tried: 0,
        wrong: Vec::new(),
    };
    classify_battery(&mut b);
    heads_battery(&mut b);
    explicit_battery(&mut b);
    merge_battery(&mut b);
    learning_battery(&mut b);
    finetune_battery(&mut b);
    upload_battery(&mut b);
    library_battery(&mut b);
    path_battery(&mut b);
    let tried = b.tried;
    let wrong = b.wrong;
    println!("bad inputs tried: {tried}");
    assert!(tried >= 60, "only {tried} bad inputs");
    assert!(
        wrong.is_empty(),
        "{} of {tried} answered wrongly:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    // Edge inputs that are valid: a 1x1 image of each format is classified.
    for img in [
        encode_png(&image::RgbImage::new(1, 1)),
        jpeg(1, 1),
        webp(1, 1),
    ] {
        let (code, v) = s.post(
            "/classify",
            &json!({"classes": CLASSES, "images": [b64(&img)]}),
        );
        assert_eq!(code, 200, "{v}");
    }
    // Nothing was written outside the data directory, and no upload was kept.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names.iter().all(
            |n| ["library", "data", "outside.safetensors"].contains(&n.as_str())
                || n.starts_with("data.")
        ),
        "{names:?}"
    );
    assert_eq!(
        std::fs::read_dir(tv_dir).unwrap().count(),
        1,
        "the library directory is unchanged"
    );
    let kept: Vec<_> = std::fs::read_dir(dir.path().join("data/task-vectors"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(kept.is_empty(), "refused uploads left files: {kept:?}");
    let (_, lib) = s.get("/task-vectors");
    // The two fixtures and the library directory's link, which the operator put there.
    assert_eq!(lib["task_vectors"].as_array().unwrap().len(), 3, "{lib}");

    // Still ready and serving, memory bounded, no panic.
    assert_eq!(s.get("/readyz").0, 200);
    let (code, _) = s.post(
        "/classify",
        &json!({"classes": CLASSES, "images": [b64(&png(2))]}),
    );
    assert_eq!(code, 200);
    let rss_after = rss_bytes(&s);
    println!(
        "RSS before {:.0} MiB, after {:.0} MiB",
        rss_before / 1048576.0,
        rss_after / 1048576.0
    );
    assert!(
        rss_after < rss_before + 256.0 * 1048576.0,
        "RSS grew from {rss_before} to {rss_after}"
    );
    let log = s.log_text();
    assert!(!log.contains("panicked"), "{log}");
}

fn classify_battery(b: &mut Battery) {
    let cl = |images: Vec<String>| json!({"classes": CLASSES, "images": images});
    let good_png = png(3);
    let mut bad_crc = good_png.clone();
    bad_crc[29] ^= 0xff; // inside IHDR's CRC
    let good_jpeg = jpeg(40, 30);
    let mut corrupt_jpeg = good_jpeg.clone();
    for x in &mut corrupt_jpeg[200..good_jpeg.len() - 2] {
        *x = 0xff;
    }
    let good_webp = webp(40, 30);
    let mut corrupt_webp = good_webp.clone();
    for x in &mut corrupt_webp[20..] {
        *x ^= 0x5a;
    }
    let image_cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated JPEG",
            good_jpeg[..good_jpeg.len() / 2].to_vec(),
            "image 0",
        ),
        ("JPEG SOI only", vec![0xff, 0xd8, 0xff], "image 0"),
        ("corrupt JPEG scan", corrupt_jpeg, "image 0"),
        ("truncated PNG", good_png[..60].to_vec(), "image 0"),
        ("PNG signature only", good_png[..8].to_vec(), "image 0"),
        ("PNG with a bad IHDR CRC", bad_crc, "image 0"),
        ("truncated WebP", good_webp[..24].to_vec(), "image 0"),
        ("corrupt WebP", corrupt_webp, "image 0"),
        ("zero-size image", Vec::new(), "image 0: image is empty"),
        (
            "PNG claiming 50000x50000",
            png_claiming(50000, 50000),
            "50000x50000",
        ),
        ("PNG claiming 0x0", png_claiming(0, 0), "image 0"),
        ("PNG claiming 1x2^31", png_claiming(1, 1 << 31), "image 0"),
        (
            "JPEG claiming 65000x65000",
            jpeg_claiming(65000, 65000),
            "65000x65000",
        ),
        (
            "GIF bytes",
            b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec(),
            "image 0",
        ),
        ("BMP header only", b"BM\x00\x00".to_vec(), "image 0"),
        ("text", b"hello, this is not a picture".to_vec(), "image 0"),
    ];
    for (what, bytes, needle) in image_cases {
        b.json(what, "/classify", cl(vec![b64(&bytes)]), 400, needle);
    }
    for (what, s) in [
        ("base64 of bad length", "abcde"),
        ("base64 padding only", "===="),
        ("url-safe base64 alphabet", "-_-_"),
        ("base64 with a NUL", "iVBO\0Rw0K"),
    ] {
        b.json(
            what,
            "/classify",
            cl(vec![s.into()]),
            400,
            "not valid base64",
        );
    }
    let body = |extra: Value| with(cl(vec![b64(&png(4))]), extra);
    b.json(
        "images not a list",
        "/classify",
        body(json!({"images": "x"})),
        400,
        "images",
    );
    b.json(
        "image a number",
        "/classify",
        body(json!({"images": [12]})),
        400,
        "images",
    );
    b.json(
        "top_k negative",
        "/classify",
        body(json!({"top_k": -1})),
        400,
        "top_k",
    );
    b.json(
        "top_k a string",
        "/classify",
        body(json!({"top_k": "5"})),
        400,
        "top_k",
    );
    b.json(
        "top_k 1.5",
        "/classify",
        body(json!({"top_k": 1.5})),
        400,
        "top_k",
    );
    b.json(
        "classes numbers",
        "/classify",
        body(json!({"classes": [1, 2]})),
        400,
        "classes",
    );
    b.json(
        "empty class name",
        "/classify",
        body(json!({"classes": ["a", ""]})),
        400,
        "empty",
    );
    b.json(
        "NUL in a class name",
        "/classify",
        body(json!({"classes": ["a\u{0}b"]})),
        400,
        "NUL",
    );
    b.json(
        "very long unicode class name",
        "/classify",
        body(json!({"classes": ["é".repeat(50_000)]})),
        400,
        "longer than",
    );
    b.json(
        "100,000 classes",
        "/classify",
        body(json!({"classes": (0..100_000).map(|i| format!("c{i}")).collect::<Vec<_>>()})),
        400,
        "between 1 and 1000",
    );
    b.json(
        "templates empty",
        "/classify",
        body(json!({"templates": []})),
        400,
        "templates",
    );
    b.json(
        "templates a number",
        "/classify",
        body(json!({"templates": 7})),
        400,
        "templates",
    );
    b.json(
        "composition with ../",
        "/classify",
        body(json!({"composition": "../../etc/passwd"})),
        404,
        "../../etc/passwd",
    );
    b.json(
        "257 images",
        "/classify",
        cl(vec![b64(&png(5)); 257]),
        400,
        "between 1 and 256",
    );
    b.json(
        "a JSON array body",
        "/classify",
        json!([1, 2]),
        400,
        "classify request",
    );
    b.json(
        "a JSON null body",
        "/classify",
        Value::Null,
        400,
        "classify request",
    );
    let j = "application/json";
    b.raw(
        "a NaN token",
        "/classify",
        j,
        br#"{"top_k": NaN}"#.to_vec(),
        "",
    );
    b.raw(
        "an Infinity token",
        "/classify",
        j,
        br#"{"top_k": Infinity}"#.to_vec(),
        "",
    );
    b.raw(
        "truncated JSON",
        "/classify",
        j,
        br#"{"classes": ["a""#.to_vec(),
        "",
    );
    b.raw(
        "JSON nested 100,000 deep",
        "/classify",
        j,
        "[".repeat(100_000).into_bytes(),
        "",
    );
    b.raw(
        "invalid UTF-8",
        "/classify",
        j,
        b"{\"classes\": [\"\xff\xfe\"]}".to_vec(),
        "",
    );
    b.send(
        "text/plain body",
        Method::POST,
        "/classify",
        |r| r.header("content-type", "text/plain").body("{}"),
        415,
        "",
    );
    b.send(
        "a 5 MiB body over the 4 MiB limit",
        Method::POST,
        "/classify",
        |r| r.json(&cl(vec!["A".repeat(5 << 20)])),
        413,
        "",
    );
    // Multipart: non-image bytes sent as image/png, broken parts.
    let request = || Part::text(json!({"classes": CLASSES}).to_string());
    let fake = Part::bytes(b"#!/bin/sh\necho not an image\n".to_vec())
        .file_name("photo.png")
        .mime_str("image/png")
        .unwrap();
    let form = Form::new().part("request", request()).part("image", fake);
    b.form(
        "multipart non-image as image/png",
        "/classify",
        form,
        "not a JPEG, PNG or WebP",
    );
    let form = Form::new()
        .part("request", request())
        .part("image", Part::bytes(Vec::new()).file_name("empty.jpg"));
    b.form("multipart empty file", "/classify", form, "is empty");
    let form = Form::new()
        .part("request", Part::text("{not json"))
        .part("image", Part::bytes(png(1)).file_name("a.png"));
    b.form(
        "multipart request part not JSON",
        "/classify",
        form,
        "not valid JSON",
    );
    let form = Form::new()
        .part("request", request())
        .part("other", Part::text("x"));
    b.form(
        "multipart unexpected field",
        "/classify",
        form,
        "unexpected multipart field",
    );
    b.send(
        "multipart cut off mid-part",
        Method::POST,
        "/classify",
        |r| {
            r.header("content-type", "multipart/form-data; boundary=XyZ")
                .body("--XyZ\r\nContent-Disposition: form-data; name=\"request\"\r\n\r\n{}")
        },
        400,
        "multipart",
    );
}

fn heads_battery(b: &mut Battery) {
    b.json("head without classes", "/heads", json!({}), 400, "classes");
    // The tokenizer lowercases: "Cat" and "cat" have the same ids, so the model cannot tell
    // them apart (with a small vocabulary, "cat" and "dog" could both be unknown words).
    let alike = "\"Cat\" and \"cat\" are the same to this model's tokenizer";
    b.json(
        "head classes the tokenizer reads alike",
        "/heads",
        json!({"classes": ["dog", "Cat", "cat"]}),
        400,
        alike,
    );
    b.json(
        "classify classes the tokenizer reads alike",
        "/classify",
        json!({"classes": ["Cat", "cat"], "images": [b64(&png(1))]}),
        400,
        alike,
    );
    let task =
        json!({"classes": ["Cat", "cat"], "examples": [{"image": b64(&png(1)), "label": 0}]});
    b.json(
        "learning classes the tokenizer reads alike",
        "/compositions",
        json!({"objective": "few_shot", "tasks": [task]}),
        400,
        &format!("task 0: classes {alike}"),
    );
    b.json(
        "head classes empty",
        "/heads",
        json!({"classes": []}),
        400,
        "between 1 and",
    );
    b.json(
        "head duplicate classes",
        "/heads",
        json!({"classes": ["x", "x"]}),
        400,
        "twice",
    );
    b.json(
        "head blank class",
        "/heads",
        json!({"classes": ["  "]}),
        400,
        "empty",
    );
    b.json(
        "head 100,000 classes",
        "/heads",
        json!({"classes": (0..100_000).map(|i| i.to_string()).collect::<Vec<_>>()}),
        400,
        "between 1 and 1000",
    );
    b.json(
        "head template with two {}",
        "/heads",
        json!({"classes": ["x"], "templates": ["{} and {}"]}),
        400,
        "exactly one {}",
    );
    b.json(
        "head 101 templates",
        "/heads",
        json!({"classes": ["x"], "templates": vec!["a {}"; 101]}),
        400,
        "between 1 and 100 templates",
    );
    b.json(
        "head unknown field",
        "/heads",
        json!({"classes": ["x"], "k": 1}),
        400,
        "k",
    );
}

fn explicit_battery(b: &mut Battery) {
    let one = |coefs: Value| json!({"task_vectors": [TV_NAMES[0]], "coefficients": coefs});
    b.json(
        "block pattern matching nothing",
        "/compositions",
        one(json!([{"*": 0.1, "vision_model.encoder.layers.99.*": 1}])),
        400,
        "pattern \"vision_model.encoder.layers.99.*\" matches no block",
    );
    b.json(
        "block patterns equally specific, different values",
        "/compositions",
        one(json!([{"*.fc1.*": 1, "*.fc2.*": 1, "*.mlp.*": 2, "*.fc1.weight": 3}])),
        400,
        "alike, with different values",
    );
    b.json(
        "coefficient \"NaN\"",
        "/compositions",
        one(json!(["NaN"])),
        400,
        "coefficients",
    );
    b.json(
        "coefficient \"Infinity\"",
        "/compositions",
        one(json!(["Infinity"])),
        400,
        "coefficients",
    );
    b.json(
        "coefficient -1e308",
        "/compositions",
        one(json!([-1e308])),
        400,
        "out of range",
    );
    b.json(
        "1e308 inside a per-block list",
        "/compositions",
        one(json!([[1e308]])),
        400,
        "",
    );
    let j = "application/json";
    let body = |c: &str| {
        format!(
            r#"{{"task_vectors": ["{}"], "coefficients": [{c}]}}"#,
            TV_NAMES[0]
        )
        .into_bytes()
    };
    b.raw(
        "a NaN coefficient token",
        "/compositions",
        j,
        body("NaN"),
        "",
    );
    b.raw(
        "an Infinity coefficient token",
        "/compositions",
        j,
        body("-Infinity"),
        "",
    );
    b.raw("coefficient 1e400", "/compositions", j, body("1e400"), "");
    b.json(
        "per-part K differing between blocks",
        "/compositions",
        one(json!([[[1.0, 2.0], [1.0]]])),
        400,
        "",
    );
    b.json(
        "by-name coefficient a string",
        "/compositions",
        one(json!([{"*": "x"}])),
        400,
        "coefficients",
    );
    b.json(
        "task vector named ../x",
        "/compositions",
        json!({"task_vectors": ["../x"], "coefficients": [1.0]}),
        400,
        "../x",
    );
    b.json(
        "task_vectors a string",
        "/compositions",
        json!({"task_vectors": TV_NAMES[0], "coefficients": [1.0]}),
        400,
        "task_vectors",
    );
    b.json(
        "no task vectors",
        "/compositions",
        json!({"task_vectors": [], "coefficients": []}),
        400,
        "task vector",
    );
    b.json(
        "coefficients an object",
        "/compositions",
        json!({"task_vectors": [TV_NAMES[0]], "coefficients": {}}),
        400,
        "coefficients",
    );
    b.json(
        "composition name 100,000 unicode characters",
        "/compositions",
        with(one(json!([0.5])), json!({"name": "ü".repeat(100_000)})),
        400,
        "name",
    );
    b.json(
        "composition name with NUL",
        "/compositions",
        with(one(json!([0.5])), json!({"name": "a\u{0}b"})),
        400,
        "name",
    );
    b.json(
        "parts_seed negative",
        "/compositions",
        with(one(json!([[[0.1, 0.2]]])), json!({"parts_seed": -1})),
        400,
        "parts_seed",
    );
    b.json("empty object", "/compositions", json!({}), 400, "");
}

/// Merges: each bad method, parameter or input is a 400 naming it, and nothing is kept.
fn merge_battery(b: &mut Battery) {
    let m = |method: &str, params: Value| json!({"method": method, "task_vectors": TV_NAMES, "params": params});
    let cases = [
        (
            "unknown method",
            m("tall_masks", json!({})),
            "method \"tall_masks\" is not known",
        ),
        (
            "misspelt parameter",
            m("ties_merging", json!({"treshold": 20})),
            "params.treshold",
        ),
        (
            "threshold 100",
            m("ties_merging", json!({"threshold": 100})),
            "params.threshold",
        ),
        (
            "threshold 1",
            m("ties_merging", json!({"threshold": 1})),
            "params.threshold",
        ),
        (
            "merge_func",
            m("ties_merging", json!({"merge_func": "median"})),
            "params.merge_func",
        ),
        (
            "remove_keys",
            m("ties_merging", json!({"remove_keys": ["x"]})),
            "params.remove_keys",
        ),
        (
            "scaling_factor text",
            m("task_arithmetic", json!({"scaling_factor": "0.3"})),
            "params.scaling_factor",
        ),
        (
            "sparsity_ratio 1",
            m("dare_task_arithmetic", json!({"sparsity_ratio": 1})),
            "params.sparsity_ratio",
        ),
        (
            "negative seed",
            m("dare_ties_merging", json!({"seed": -3})),
            "params.seed",
        ),
        (
            "linear weights only",
            m("dare_task_arithmetic", json!({"only_on_linear_weights": 1})),
            "params.only_on_linear_weights",
        ),
        (
            "an unknown excluded tensor",
            m("iso_c", json!({"exclude_keys": ["no.such.tensor"]})),
            "params.exclude_keys",
        ),
        (
            "weights count",
            m("breadcrumbs", json!({"weight": [1, 2, 3]})),
            "params.weight",
        ),
        (
            "gamma",
            m("breadcrumbs", json!({"gamma": -0.1})),
            "params.gamma",
        ),
        ("params not an object", m("magmax", json!([0.5])), "params"),
        (
            "no task vectors",
            json!({"method": "magmax", "task_vectors": []}),
            "at least one task vector",
        ),
        (
            "unknown task vector",
            json!({"method": "magmax", "task_vectors": ["nope"]}),
            "unknown task vector \"nope\"",
        ),
        (
            "task vector twice",
            json!({"method": "magmax", "task_vectors": [TV_NAMES[0], TV_NAMES[0]]}),
            "listed twice",
        ),
        (
            "derived name a path",
            json!({"method": "magmax", "task_vectors": TV_NAMES, "task_vector": "../x"}),
            "task-vector name",
        ),
        (
            "coefficients beside method",
            json!({"method": "magmax", "task_vectors": TV_NAMES, "coefficients": [1, 1]}),
            "coefficients",
        ),
    ];
    let img = b64(&png(4));
    let tasks = |n: usize, classes: bool| -> Value {
        let t = match classes {
            true => json!({"classes": CLASSES, "examples": [{"image": img}]}),
            false => json!({"examples": [{"image": img}]}),
        };
        Value::Array(vec![t; n])
    };
    let data = |method: &str, tasks: Value, params: Value| json!({"method": method, "task_vectors": TV_NAMES, "tasks": tasks, "params": params});
    let n = TV_NAMES.len();
    let data_cases = [
        ("regmean without tasks", m("regmean", json!({})), "tasks"),
        (
            "one task too few",
            data("regmean", tasks(n - 1, false), json!({})),
            "one task per task vector",
        ),
        (
            "fisher without classes",
            data("fisher_merging", tasks(n, false), json!({})),
            "task 0",
        ),
        (
            "tasks for a data-free merge",
            data("magmax", tasks(n, true), json!({})),
            "reads no data",
        ),
        (
            "a task without examples",
            data(
                "regmean",
                json!(vec![json!({"examples": []}); n]),
                json!({}),
            ),
            "task 0 has no examples",
        ),
        (
            "a corrupt example",
            data(
                "regmean",
                json!(vec![json!({"examples": [{"image": "AAAA"}]}); n]),
                json!({}),
            ),
            "task 0 example 0",
        ),
        (
            "ratio above 1",
            data(
                "regmean",
                tasks(n, false),
                json!({"reduce_non_diagonal_ratio": 1.5}),
            ),
            "params.reduce_non_diagonal_ratio",
        ),
        (
            "weight_transpose false",
            data(
                "regmean",
                tasks(n, false),
                json!({"weight_transpose": false}),
            ),
            "params.weight_transpose",
        ),
        (
            "an exclusion regex",
            data(
                "fisher_merging",
                tasks(n, true),
                json!({"exclude_param_names_regex": ["x"]}),
            ),
            "params.exclude_param_names_regex",
        ),
        (
            "batch size text",
            data(
                "fisher_merging",
                tasks(n, true),
                json!({"dataloader_kwargs": {"batch_size": "x"}}),
            ),
            "params.dataloader_kwargs",
        ),
        (
            "an unknown loader setting",
            data(
                "regmean",
                tasks(n, false),
                json!({"dataloader_kwargs": {"shuffle": true}}),
            ),
            "shuffle",
        ),
        (
            "minimal weight 0",
            data(
                "fisher_merging",
                tasks(n, true),
                json!({"minimal_fisher_weight": 0}),
            ),
            "params.minimal_fisher_weight",
        ),
    ];
    for (what, body, needle) in cases.into_iter().chain(data_cases) {
        b.json(
            &format!("merge: {what}"),
            "/compositions",
            body,
            400,
            needle,
        );
    }
}

fn learning_battery(b: &mut Battery) {
    let img = b64(&png(6));
    let job = |task: Value, extra: Value| {
        with(
            json!({"objective": "few_shot", "task_vectors": [TV_NAMES[0]], "tasks": [task]}),
            extra,
        )
    };
    let task =
        |label: Value| json!({"classes": CLASSES, "examples": [{"image": img, "label": label}]});
    let none = json!({});
    b.json(
        "label -1",
        "/compositions",
        job(task(json!(-1)), none.clone()),
        400,
        "label",
    );
    b.json(
        "label = class count",
        "/compositions",
        job(task(json!(3)), none.clone()),
        400,
        "out of range",
    );
    b.json(
        "label 2^32",
        "/compositions",
        job(task(json!(1u64 << 32)), none.clone()),
        400,
        "label",
    );
    b.json(
        "label a string",
        "/compositions",
        job(task(json!("cat")), none.clone()),
        400,
        "label",
    );
    b.json(
        "K 65 (over the limit)",
        "/compositions",
        job(task(json!(0)), json!({"layout": {"parts": 65}})),
        400,
        "parts must be between",
    );
    b.json(
        "K -1",
        "/compositions",
        job(task(json!(0)), json!({"layout": {"parts": -1}})),
        400,
        "layout",
    );
    let empty_classes = json!({"classes": [], "examples": [{"image": img, "label": 0}]});
    b.json(
        "task without classes",
        "/compositions",
        job(empty_classes, none.clone()),
        400,
        "class names",
    );
    let dup = json!({"classes": ["a", "a"], "examples": [{"image": img, "label": 0}]});
    b.json(
        "task duplicate classes",
        "/compositions",
        job(dup, none.clone()),
        400,
        "twice",
    );
    let many = json!({"classes": (0..100_000).map(|i| format!("k{i}")).collect::<Vec<_>>(),
        "examples": [{"image": img, "label": 0}]});
    b.json(
        "task 100,000 classes",
        "/compositions",
        job(many, none.clone()),
        400,
        "between 1 and 1000",
    );
    let no_examples = json!({"classes": CLASSES, "examples": []});
    b.json(
        "task without examples",
        "/compositions",
        job(no_examples, none.clone()),
        400,
        "example",
    );
    let both =
        json!({"classes": CLASSES, "examples": [{"image": img, "file": "a.png", "label": 0}]});
    b.json(
        "example with image and file",
        "/compositions",
        job(both, none.clone()),
        400,
        "example 0",
    );
    let missing = json!({"classes": CLASSES, "examples": [{"file": "nowhere.png", "label": 0}]});
    b.json(
        "example naming a missing part",
        "/compositions",
        job(missing, none.clone()),
        400,
        "nowhere.png",
    );
    let bad_b64 = json!({"classes": CLASSES, "examples": [{"image": "@@@", "label": 0}]});
    b.json(
        "example invalid base64",
        "/compositions",
        job(bad_b64, none.clone()),
        400,
        "base64",
    );
    for (what, config, needle) in [
        ("batch_size 0", json!({"batch_size": 0}), "batch_size"),
        (
            "val_fraction 2",
            json!({"val_fraction": 2.0}),
            "val_fraction",
        ),
        ("lr \"NaN\"", json!({"lr": "NaN"}), "lr"),
        (
            "lr 1e308",
            json!({"lr": 1e308}),
            "lr must be a positive number at most 10",
        ),
        ("epochs 0", json!({"epochs": 0}), "epochs"),
        (
            "weight_decay -1",
            json!({"weight_decay": -1.0}),
            "weight_decay",
        ),
        ("unknown config key", json!({"momentum": 0.9}), "momentum"),
    ] {
        b.json(
            what,
            "/compositions",
            job(task(json!(0)), json!({"config": config})),
            400,
            needle,
        );
    }
    // The job above names one task vector: a budget keeps 1 of 1 at most.
    for (what, budget, needle) in [
        (
            "budget 0",
            json!({"task_vectors": 0}),
            "budget.task_vectors",
        ),
        (
            "budget over the job's",
            json!({"task_vectors": 2}),
            "budget.task_vectors",
        ),
        (
            "budget negative",
            json!({"task_vectors": -1}),
            "task_vectors",
        ),
        (
            "budget without a size",
            json!({"blockwise": true}),
            "task_vectors",
        ),
        (
            "budget blockwise a string",
            json!({"task_vectors": 1, "blockwise": "yes"}),
            "blockwise",
        ),
        (
            "unknown budget key",
            json!({"task_vectors": 1, "per": "block"}),
            "per",
        ),
    ] {
        b.json(
            what,
            "/compositions",
            job(task(json!(0)), json!({"budget": budget})),
            400,
            needle,
        );
    }
    b.json(
        "no tasks",
        "/compositions",
        json!({"objective": "few_shot", "tasks": []}),
        400,
        "task",
    );
    b.json(
        "objective a number",
        "/compositions",
        json!({"objective": 5, "tasks": []}),
        400,
        "objective",
    );
    let request = json!({"objective": "few_shot", "task_vectors": [TV_NAMES[0]],
        "tasks": [{"classes": CLASSES, "examples": [{"file": "x.jpg", "label": 0}]}]});
    let form = Form::new()
        .part("request", Part::text(request.to_string()))
        .part(
            "files",
            Part::bytes(b"MZ\x90\x00 not an image".to_vec())
                .file_name("x.jpg")
                .mime_str("image/jpeg")
                .unwrap(),
        );
    b.form(
        "multipart example non-image as image/jpeg",
        "/compositions",
        form,
        "task 0 example 0",
    );
}

/// `POST /task-vectors` with `finetune`: every parameter checked before a job is queued, and
/// the 400 names it.
fn finetune_battery(b: &mut Battery) {
    let img = b64(&png(6));
    let ft = |extra: Value| {
        let base = json!({"classes": CLASSES, "examples": [{"image": img, "label": 0}]});
        json!({"name": "ft", "finetune": with(base, extra)})
    };
    for (what, config, needle) in [
        ("epochs 0", json!({"epochs": 0}), "finetune.config.epochs"),
        (
            "epochs 10^6",
            json!({"epochs": 1_000_000}),
            "finetune.config.epochs",
        ),
        (
            "batch_size 0",
            json!({"batch_size": 0}),
            "finetune.config.batch_size",
        ),
        ("lr 0", json!({"lr": 0.0}), "finetune.config.lr"),
        ("lr negative", json!({"lr": -1.0}), "finetune.config.lr"),
        (
            "weight_decay negative",
            json!({"weight_decay": -0.1}),
            "finetune.config.weight_decay",
        ),
        ("warmup 2", json!({"warmup": 2.0}), "finetune.config.warmup"),
        (
            "unknown finetune config key",
            json!({"momentum": 0.9}),
            "momentum",
        ),
    ] {
        b.json(
            what,
            "/task-vectors",
            ft(json!({"config": config})),
            400,
            needle,
        );
    }
    b.json(
        "finetune without examples",
        "/task-vectors",
        ft(json!({"examples": []})),
        400,
        "finetune.examples",
    );
    b.json(
        "finetune example without a label",
        "/task-vectors",
        ft(json!({"examples": [{"image": img}]})),
        400,
        "finetune example 0",
    );
    b.json(
        "finetune label out of range",
        "/task-vectors",
        ft(json!({"examples": [{"image": img, "label": 4}]})),
        400,
        "label 4",
    );
    b.json(
        "finetune example not an image",
        "/task-vectors",
        ft(json!({"examples": [{"image": b64(b"not an image"), "label": 0}]})),
        400,
        "finetune example 0",
    );
    b.json(
        "finetune without classes",
        "/task-vectors",
        ft(json!({"classes": []})),
        400,
        "finetune",
    );
    b.json(
        "finetune and a file",
        "/task-vectors",
        with(ft(json!({})), json!({"file": "x.safetensors"})),
        400,
        "exactly one source",
    );
    b.json(
        "finetune under a bad name",
        "/task-vectors",
        with(ft(json!({})), json!({"name": "../x"})),
        400,
        "task-vector name",
    );
    b.json(
        "finetune under a taken name",
        "/task-vectors",
        with(ft(json!({})), json!({"name": TV_NAMES[0]})),
        409,
        "exists already",
    );
    b.json(
        "unknown finetune key",
        "/task-vectors",
        ft(json!({"steps": 3})),
        400,
        "steps",
    );
}

fn upload_battery(b: &mut Battery) {
    let up = |name: &str, bytes: &[u8]| json!({"name": name, "safetensors": b64(bytes)});
    let (header, data) = fixture_tv();
    let mut huge = (1u64 << 63).to_le_bytes().to_vec();
    huge.extend_from_slice(b"{}");
    b.json(
        "header length 2^63",
        "/task-vectors",
        up("h63", &huge),
        400,
        "h63",
    );
    let mut longer = 1_000_000u64.to_le_bytes().to_vec();
    longer.extend_from_slice(b"{}");
    b.json(
        "header longer than the file",
        "/task-vectors",
        up("hl", &longer),
        400,
        "hl",
    );
    let mut not_json = 4u64.to_le_bytes().to_vec();
    not_json.extend_from_slice(b"{{{{");
    b.json(
        "header not JSON",
        "/task-vectors",
        up("hj", &not_json),
        400,
        "hj",
    );
    b.json(
        "seven bytes",
        "/task-vectors",
        up("h7", b"1234567"),
        400,
        "h7",
    );
    b.json("empty upload", "/task-vectors", up("h0", b""), 400, "h0");
    let overlap = tv_with(|t| t["data_offsets"] = json!([64, 192]));
    b.json(
        "overlapping offsets",
        "/task-vectors",
        up("ov", &overlap),
        400,
        "ov",
    );
    let beyond = tv_with(|t| t["data_offsets"] = json!([0, data.len() as u64 + 128]));
    b.json(
        "offsets past the end",
        "/task-vectors",
        up("oe", &beyond),
        400,
        "oe",
    );
    let reversed = tv_with(|t| t["data_offsets"] = json!([128, 0]));
    b.json(
        "offsets reversed",
        "/task-vectors",
        up("or", &reversed),
        400,
        "or",
    );
    let giant = tv_with(|t| t["data_offsets"] = json!([0, u64::MAX]));
    b.json(
        "offset 2^64-1",
        "/task-vectors",
        up("og", &giant),
        400,
        "og",
    );
    let f64s = tv_with(|t| t["dtype"] = json!("F64"));
    b.json(
        "dtype F64 with F32 bytes",
        "/task-vectors",
        up("dt", &f64s),
        400,
        "dt",
    );
    let ints = tv_with(|t| t["dtype"] = json!("I64"));
    b.json("dtype I64", "/task-vectors", up("di", &ints), 400, "di");
    let unknown = tv_with(|t| t["dtype"] = json!("Q4"));
    b.json(
        "unknown dtype",
        "/task-vectors",
        up("dq", &unknown),
        400,
        "dq",
    );
    let shape = tv_with(|t| t["shape"] = json!([33]));
    b.json(
        "shape not matching its bytes",
        "/task-vectors",
        up("sb", &shape),
        400,
        "sb",
    );
    let reshaped = tv_with(|t| t["shape"] = json!([2, 16]));
    b.json(
        "shape not matching the backbone",
        "/task-vectors",
        up("sm", &reshaped),
        400,
        "sm",
    );
    let overflow = tv_with(|t| t["shape"] = json!([u64::MAX, 2]));
    b.json(
        "shape overflowing",
        "/task-vectors",
        up("so", &overflow),
        400,
        "so",
    );
    let mut renamed = header.clone();
    let entries: Vec<(String, Value)> = renamed
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| (format!("no.such.{k}"), v.clone()))
        .collect();
    renamed.retain(|k, _| k == "__metadata__");
    renamed.extend(entries);
    b.json(
        "tensors the backbone does not have",
        "/task-vectors",
        up("un", &safetensors(&renamed, &data)),
        400,
        "un",
    );
    let valid = safetensors(&header, &data);
    for (what, name, needle) in [
        (
            "name with ../",
            "../../outside".to_string(),
            "must be 1 to 100",
        ),
        ("name with a slash", "a/b".into(), "must be 1 to 100"),
        ("name with NUL", "a\u{0}b".into(), "must be 1 to 100"),
        (
            "name 100,000 unicode",
            "ß".repeat(100_000),
            "must be 1 to 100",
        ),
        ("name 101 characters", "n".repeat(101), "must be 1 to 100"),
        ("name empty", String::new(), "must be 1 to 100"),
        ("name a dot", ".".into(), "must be 1 to 100"),
        ("name ..", "..".into(), "must be 1 to 100"),
    ] {
        b.json(what, "/task-vectors", up(&name, &valid), 400, needle);
    }
    b.json(
        "safetensors invalid base64",
        "/task-vectors",
        json!({"name": "bb", "safetensors": "!!"}),
        400,
        "not valid base64",
    );
    b.json(
        "safetensors a number",
        "/task-vectors",
        json!({"name": "bn", "safetensors": 5}),
        400,
        "safetensors",
    );
    b.json(
        "upload without a name",
        "/task-vectors",
        json!({"safetensors": "AA=="}),
        400,
        "name",
    );
    let two = Form::new()
        .part("request", Part::text(json!({"name": "two"}).to_string()))
        .part("a", Part::bytes(valid.clone()).file_name("a.safetensors"))
        .part("b", Part::bytes(valid.clone()).file_name("b.safetensors"));
    b.form("multipart two files", "/task-vectors", two, "once");
    let hostile = Form::new()
        .part(
            "request",
            Part::text(json!({"name": "hostile"}).to_string()),
        )
        .part(
            "f",
            Part::bytes(huge).file_name("../../../escaped.safetensors"),
        );
    b.form(
        "multipart hostile file name, bad bytes",
        "/task-vectors",
        hostile,
        "hostile",
    );
}

/// `file` and `checkpoint` sources, with a library directory configured (holding one link to a
/// task vector outside it).
fn library_battery(b: &mut Battery) {
    let src = |key: &str, value: &str| json!({"name": "lib", key: value});
    for (what, file, code, needle) in [
        (
            "file ../",
            "../outside.safetensors",
            400,
            "relative path inside",
        ),
        ("file absolute", "/etc/passwd", 400, "relative path inside"),
        (
            "file a/../../",
            "a/../../outside.safetensors",
            400,
            "relative path inside",
        ),
        (
            "file with NUL",
            "x\u{0}.safetensors",
            400,
            "relative path inside",
        ),
        (
            "file linking outside",
            "link.safetensors",
            400,
            "resolves outside",
        ),
        (
            "file missing",
            "missing.safetensors",
            404,
            "missing.safetensors",
        ),
        ("file the directory itself", "", 400, ""),
    ] {
        b.json(what, "/task-vectors", src("file", file), code, needle);
    }
    for (what, ckpt, needle) in [
        ("checkpoint ../", "../", "relative path inside"),
        ("checkpoint absolute", "/", "relative path inside"),
        (
            "checkpoint a local path outside",
            "src/../../../tests/fixtures/tiny/clip",
            "inside",
        ),
        (
            "checkpoint hub id with ../ revision",
            "org/name@../../x",
            "inside the library",
        ),
        (
            "checkpoint hub id not cached (offline)",
            "no-org/no-model",
            "no-org/no-model",
        ),
    ] {
        b.json(what, "/task-vectors", src("checkpoint", ckpt), 400, needle);
    }
    for (what, ckpt, code, needle) in [
        (
            "checkpoint ./ missing",
            "./missing",
            404,
            "checkpoint \"./missing\": nothing of that name",
        ),
        (
            "checkpoint ./../",
            "./../x",
            400,
            "checkpoint \"./../x\" must be a relative path",
        ),
        (
            "checkpoint ./ link outside",
            "./link.safetensors",
            400,
            "checkpoint \"./link.safetensors\" resolves outside",
        ),
        (
            "checkpoint neither local nor hub id",
            "nothing-here",
            404,
            "not a hub id",
        ),
    ] {
        b.json(what, "/task-vectors", src("checkpoint", ckpt), code, needle);
    }
    b.json(
        "two sources",
        "/task-vectors",
        json!({"name": "two", "file": "x", "checkpoint": "y"}),
        400,
        "exactly one source",
    );
}

fn path_battery(b: &mut Battery) {
    for (what, method, path, code) in [
        (
            "composition id ..%2F..",
            Method::GET,
            "/compositions/..%2F..%2Fetc",
            404,
        ),
        ("composition id NUL", Method::GET, "/compositions/%00", 404),
        (
            "head id 5,000 characters",
            Method::GET,
            &format!("/heads/{}", "h".repeat(5_000)),
            404,
        ),
        (
            "head id 10,000 characters (a target over 8 KiB)",
            Method::GET,
            &format!("/heads/{}", "h".repeat(10_000)),
            414,
        ),
        (
            "task vector %2F name",
            Method::GET,
            "/task-vectors/..%2Fatlas.db",
            404,
        ),
        (
            "delete task vector ..%2F",
            Method::DELETE,
            "/task-vectors/..%2Fatlas.db",
            404,
        ),
        (
            "cancel, id not UTF-8",
            Method::POST,
            "/compositions/%FF/cancel",
            400,
        ),
        (
            "heat map of nothing",
            Method::GET,
            "/compositions/x/coefficients.png",
            404,
        ),
        (
            "events of nothing",
            Method::GET,
            "/compositions/x/events",
            404,
        ),
        ("limit -1", Method::GET, "/compositions?limit=-1", 400),
        ("limit a word", Method::GET, "/compositions?limit=many", 400),
        (
            "limit 10^12",
            Method::GET,
            "/compositions?limit=1000000000000",
            400,
        ),
        (
            "offset 2^64",
            Method::GET,
            "/compositions?offset=18446744073709551616",
            400,
        ),
        ("PUT on /classify", Method::PUT, "/classify", 405),
        ("PUT on /heads/x", Method::PUT, "/heads/x", 405),
        (
            "DELETE of a head never stored",
            Method::DELETE,
            "/heads/x",
            404,
        ),
    ] {
        b.read(what, method, path, code, "");
    }
}

/// Every documented form of `checkpoint`: `./dir` was refused with a message about `file`, and
/// `sub/dir` (a directory inside the library) was taken for a hub id.
#[test]
fn checkpoint_forms_are_read_from_where_the_docs_say() {
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("library");
    for (from, to) in [("ft_b", "ft"), ("ft_c", "sub/ft_c")] {
        let to = lib.join(to);
        std::fs::create_dir_all(&to).unwrap();
        for f in std::fs::read_dir(fixtures().join(from)).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
        }
    }
    let s = start(
        &dir.path().join("data"),
        &common::library_flags(&lib),
        &[("HF_HUB_OFFLINE", "1")],
    );
    for (name, ckpt) in [("dot", "./ft"), ("sub", "sub/ft_c")] {
        let (code, tv) = s.post("/task-vectors", &json!({"name": name, "checkpoint": ckpt}));
        assert_eq!(code, 201, "{ckpt}: {tv}");
        assert_eq!(tv["source"], format!("checkpoint {ckpt}"));
    }
    // A hub id is still a hub id when nothing of its name is in the library.
    let (code, p) = s.post(
        "/task-vectors",
        &json!({"name": "hub", "checkpoint": "sub/not-here"}),
    );
    assert_eq!(code, 400, "{p}");
    let detail = p["detail"].as_str().unwrap();
    assert!(detail.contains("HF_HUB_OFFLINE"), "{detail}");
    let (code, p) = s.post(
        "/task-vectors",
        &json!({"name": "gone", "checkpoint": "./gone"}),
    );
    assert_eq!(code, 404, "{p}");
    let detail = p["detail"].as_str().unwrap();
    assert!(detail.starts_with("checkpoint \"./gone\""), "{detail}");
    assert!(!detail.contains("file"), "{detail}");
}
