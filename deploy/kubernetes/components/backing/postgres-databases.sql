-- The experiment registry's database; the model registry's is POSTGRES_DB (fresco_models).
CREATE DATABASE fresco_experiments OWNER fresco;
