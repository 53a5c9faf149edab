// The API page: Swagger UI (from the fastapi-swagger package, served by this portal) over /openapi.json.
// Requests made from it ("Try it out") carry the token this browser stores for the portal.

import { token } from "./common.js";

function load(tag, attrs) {
  return new Promise((resolve, reject) => {
    const node = Object.assign(document.createElement(tag), attrs);
    node.onload = resolve;
    node.onerror = () => reject(new Error(`could not load ${attrs.src || attrs.href}`));
    document.head.append(node);
  });
}

const root = document.getElementById("swagger-ui");
try {
  await Promise.all([load("link", { rel: "stylesheet", href: "/static/swagger-ui.css" }),
                     load("script", { src: "/static/swagger-ui-bundle.js" })]);
  root.textContent = "";
  window.SwaggerUIBundle({
    url: "/openapi.json",
    domNode: root,
    deepLinking: true,
    validatorUrl: null, // no request to validator.swagger.io: nothing leaves this server
    requestInterceptor: (request) => {
      const t = token();
      if (t && !request.headers.Authorization) request.headers.Authorization = `Bearer ${t}`;
      return request;
    },
  });
} catch (err) {
  root.textContent = `${err.message}; the API description is at /openapi.json`;
}
