-- Users with a balance, products with stock, orders paid from the balance.

CREATE TABLE IF NOT EXISTS app_user (
    user_id    BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    name       VARCHAR(100)    NOT NULL,
    balance    BIGINT UNSIGNED NOT NULL DEFAULT 0,
    created_at DATETIME(6)     NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (user_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE IF NOT EXISTS product (
    product_id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    name       VARCHAR(200)    NOT NULL,
    price      BIGINT UNSIGNED NOT NULL,
    stock      INT UNSIGNED    NOT NULL,
    -- Counts changes; product events carry it so caches keep only the newest state.
    version    BIGINT UNSIGNED NOT NULL DEFAULT 1,
    created_at DATETIME(6)     NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at DATETIME(6)     NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (product_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- An order's amounts are fixed when it is placed (prices of that moment); paying it checks
-- balance, stock and coupon again.
CREATE TABLE IF NOT EXISTS customer_order (
    order_id          BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    user_id           BIGINT UNSIGNED NOT NULL,
    status            VARCHAR(16)     NOT NULL DEFAULT 'PENDING',
    total_amount      BIGINT UNSIGNED NOT NULL,
    discount_amount   BIGINT UNSIGNED NOT NULL,
    pay_amount        BIGINT UNSIGNED NOT NULL,
    coupon_history_id BIGINT UNSIGNED NULL,
    created_at        DATETIME(6)     NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    paid_at           DATETIME(6)     NULL,
    PRIMARY KEY (order_id),
    KEY customer_order_by_user (user_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

CREATE TABLE IF NOT EXISTS order_item (
    order_id   BIGINT UNSIGNED NOT NULL,
    product_id BIGINT UNSIGNED NOT NULL,
    quantity   INT UNSIGNED    NOT NULL,
    unit_price BIGINT UNSIGNED NOT NULL,
    PRIMARY KEY (order_id, product_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- One payment per order: paying twice cannot charge twice, whatever the application does.
CREATE TABLE IF NOT EXISTS payment (
    payment_id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    order_id   BIGINT UNSIGNED NOT NULL,
    user_id    BIGINT UNSIGNED NOT NULL,
    amount     BIGINT UNSIGNED NOT NULL,
    paid_at    DATETIME(6)     NOT NULL,
    PRIMARY KEY (payment_id),
    UNIQUE KEY payment_one_per_order (order_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- The coupon a payment used; a history row is used at most once.
ALTER TABLE coupon_history ADD COLUMN used_order_id BIGINT UNSIGNED NULL AFTER status;
