//! The HTTP API: one module per endpoint (its request and response types, its
//! checks, its conversion to the engine's terms), and this route table. What
//! chat and text completions share (admission, sampling parameters, running a
//! generation whole or streamed) is in [`generation`]; the extractors every
//! endpoint uses (tenant, admin caller, bounded body) in [`crate::extract`].

pub(crate) mod admin;
mod chat;
mod completions;
pub(crate) mod feedback;
pub(crate) mod generation;
mod health;
mod models;
mod tokenize;

pub use generation::peer::{remember_peer, PeerFd};

use crate::AppState;
use actix_web::web;

pub(crate) type Data = web::Data<AppState>;

/// Every route the server answers.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/health", web::get().to(health::health))
        .route("/ready", web::get().to(health::ready))
        .route("/metrics", web::get().to(crate::metrics::scrape))
        .route("/v1/models", web::get().to(models::list))
        .route("/v1/chat/completions", web::post().to(chat::create))
        .route("/v1/completions", web::post().to(completions::create))
        .route("/tokenize", web::post().to(tokenize::tokenize));
    feedback::configure(cfg);
    admin::configure(cfg);
    admin::data::configure(cfg);
}
