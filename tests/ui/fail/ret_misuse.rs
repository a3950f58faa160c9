//! `ret` in a target names the written result: rendered after the body,
//! from the result alone.

use cache_runtime::{cache_put, invalidates, redis_cached};

#[derive(serde::Serialize, serde::Deserialize)]
struct Product {
    id: u64,
    sku: String,
}

#[redis_cached(key = "sku:<sku>", ttl = 60)]
async fn by_sku(sku: &str) -> Option<Product> {
    let _ = sku;
    None
}

#[redis_cached(key = "shop:<shop>:sku:<sku>", ttl = 60)]
async fn in_shop(shop: u64, sku: &str) -> Option<Product> {
    let _ = (shop, sku);
    None
}

/// A parameter beside `ret`: moved into the body by then.
#[invalidates(in_shop(shop, &ret.sku))]
async fn update_in_shop(shop: u64, id: u64) -> Result<Product, ()> {
    let _ = shop;
    Ok(Product { id, sku: String::new() })
}

/// A put's key is rendered before the body.
#[cache_put(by_sku(&ret.sku))]
async fn put_by_sku(id: u64) -> Result<Product, ()> {
    Ok(Product { id, sku: String::new() })
}

/// A parameter named `ret`.
#[invalidates(by_sku(&ret.sku))]
async fn shadowed(ret: Product) -> Result<Product, ()> {
    Ok(ret)
}

/// `ret` is the `Ok` value: a field it does not have is rustc's error.
#[invalidates(by_sku(&ret.code))]
async fn wrong_field(id: u64) -> Result<Product, ()> {
    Ok(Product { id, sku: String::new() })
}

fn main() {}
