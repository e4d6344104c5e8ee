//! Plumbing over `wasi:http` and `wasi:io`, with no policy in it: header
//! fields, local answers, and bodies moved with `blocking-splice` (the host
//! copies the bytes, a bounded chunk at a time; the component never holds a
//! body).

use crate::bindings::http::{Fields, IncomingBody, Method, OutgoingBody, OutgoingResponse, ResponseOutparam};
use crate::bindings::streams::{InputStream, OutputStream, StreamError};

/// The most bytes one splice moves.
const CHUNK: u64 = 256 * 1024;

/// Connection-level headers, never forwarded in either direction (RFC 9110,
/// 7.6.1), and `host`, which the upstream's authority replaces.
const HOP_BY_HOP: [&str; 8] =
    ["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host"];

/// The method as it goes on the wire.
pub(crate) fn method_name(method: &Method) -> &str {
    match method {
        Method::Get => "GET",
        Method::Head => "HEAD",
        Method::Post => "POST",
        Method::Put => "PUT",
        Method::Delete => "DELETE",
        Method::Connect => "CONNECT",
        Method::Options => "OPTIONS",
        Method::Trace => "TRACE",
        Method::Patch => "PATCH",
        Method::Other(other) => other,
    }
}

/// The fields to send on: no pseudo-headers, no hop-by-hop headers, and
/// none the host forbids a guest to set (it refuses those one by one).
pub(crate) fn forwardable(headers: &[(String, Vec<u8>)]) -> Fields {
    let fields = Fields::new();
    for (name, value) in headers {
        if !name.starts_with(':') && !HOP_BY_HOP.contains(&name.as_str()) {
            let _ = fields.append(name, value);
        }
    }
    fields
}

/// Streams `from` (when there is a body) into `to` and finishes `to`.
pub(crate) fn copy_body(from: Option<IncomingBody>, to: OutgoingBody) -> Result<(), ()> {
    if let Some(from) = from {
        let (Ok(input), Ok(output)) = (from.stream(), to.write()) else { return Err(()) };
        splice_all(&input, &output)?;
        drop((input, output));
        drop(IncomingBody::finish(from));
    }
    OutgoingBody::finish(to, None).map_err(|_| ())
}

/// Moves bytes until the input ends; an error when either side fails.
fn splice_all(input: &InputStream, output: &OutputStream) -> Result<(), ()> {
    loop {
        match output.blocking_splice(input, CHUNK) {
            Ok(_) => {}
            // `closed` is the input's end, or the output's: only an output
            // that still takes writes proves it was the input's.
            Err(StreamError::Closed) => return output.check_write().map(drop).map_err(drop),
            Err(StreamError::LastOperationFailed(_)) => return Err(()),
        }
    }
}

/// Answers locally with a small body.
pub(crate) fn respond(out: ResponseOutparam, status: u16, headers: &[(&str, &str)], body: &str) {
    let fields = Fields::new();
    for (name, value) in headers {
        let _ = fields.append(name, value.as_bytes());
    }
    let _ = fields.append("content-length", body.len().to_string().as_bytes());
    let response = OutgoingResponse::new(fields);
    let _ = response.set_status_code(status);
    let Ok(outgoing_body) = response.body() else { return };
    ResponseOutparam::set(out, Ok(response));
    if let Ok(stream) = outgoing_body.write() {
        for chunk in body.as_bytes().chunks(4096) {
            if stream.blocking_write_and_flush(chunk).is_err() {
                return;
            }
        }
        drop(stream);
    }
    let _ = OutgoingBody::finish(outgoing_body, None);
}
