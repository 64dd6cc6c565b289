// Starts Swagger UI on strata's own OpenAPI document. No validator badge (it would
// send the document to validator.swagger.io) and no request leaves this origin.
window.ui = SwaggerUIBundle({
  url: '/v1/openapi.json',
  dom_id: '#swagger-ui',
  deepLinking: true,
  validatorUrl: null,
  tryItOutEnabled: false,
  persistAuthorization: false,
});
